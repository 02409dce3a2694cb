//! [`BoundedRetryPolicy`]: when the driver may send a failed request again.

use scylla::errors::{DbError, RequestAttemptError, WriteType};
use scylla::policies::retry::{RequestInfo, RetryDecision, RetryPolicy, RetrySession};

/// Retries a failed request at most `max_retries` times, and only when a
/// retry cannot write twice:
///
/// - after errors that prove the request did not run (unavailable
///   replicas, an overloaded or bootstrapping coordinator, a coordinator
///   that rate-limited it, no free stream), any statement, on the next
///   node;
/// - after a read or write timeout, only statements marked idempotent, on
///   the same node: the coordinator answered, its replicas were slow, and
///   another coordinator would ask the same replicas (this is also what
///   lets a one-node cluster, or the one node left in a datacenter, retry);
/// - after other errors that leave the outcome unknown (a broken
///   connection, a server error), only idempotent statements, on the next
///   node;
/// - a lightweight transaction never (the store reads back its outcome).
#[derive(Debug, Clone, Copy)]
pub struct BoundedRetryPolicy {
    max_retries: u32,
}

impl BoundedRetryPolicy {
    /// A policy allowing `max_retries` retries per request.
    pub fn new(max_retries: u32) -> Self {
        Self { max_retries }
    }
}

impl RetryPolicy for BoundedRetryPolicy {
    fn new_session(&self) -> Box<dyn RetrySession> {
        Box::new(BoundedRetrySession {
            max_retries: self.max_retries,
            left: self.max_retries,
        })
    }
}

struct BoundedRetrySession {
    max_retries: u32,
    left: u32,
}

/// What to do after `error`, retries left aside.
fn decide(error: &RequestAttemptError, idempotent: bool) -> RetryDecision {
    let next = RetryDecision::RetryNextTarget(None);
    let same = RetryDecision::RetrySameTarget(None);
    match error {
        RequestAttemptError::UnableToAllocStreamId => next,
        RequestAttemptError::BrokenConnectionError(_) if idempotent => next,
        RequestAttemptError::DbError(db, _) => match db {
            DbError::Unavailable { .. } | DbError::Overloaded | DbError::IsBootstrapping => next,
            DbError::RateLimitReached {
                rejected_by_coordinator: true,
                ..
            } => next,
            DbError::ServerError | DbError::TruncateError if idempotent => next,
            DbError::ReadTimeout { .. } if idempotent => same,
            DbError::ReadFailure { .. } if idempotent => next,
            DbError::WriteTimeout { write_type, .. }
                if idempotent && *write_type != WriteType::Cas =>
            {
                same
            }
            DbError::WriteFailure { write_type, .. }
                if idempotent && *write_type != WriteType::Cas =>
            {
                next
            }
            _ => RetryDecision::DontRetry,
        },
        _ => RetryDecision::DontRetry,
    }
}

impl RetrySession for BoundedRetrySession {
    fn decide_should_retry(&mut self, request_info: RequestInfo) -> RetryDecision {
        if self.left == 0 {
            return RetryDecision::DontRetry;
        }
        let decision = decide(request_info.error, request_info.is_idempotent);
        if decision != RetryDecision::DontRetry {
            self.left -= 1;
        }
        decision
    }

    fn reset(&mut self) {
        self.left = self.max_retries;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scylla::statement::Consistency;

    fn timeout(write_type: WriteType) -> RequestAttemptError {
        RequestAttemptError::DbError(
            DbError::WriteTimeout {
                consistency: Consistency::LocalQuorum,
                received: 1,
                required: 2,
                write_type,
            },
            "timed out".into(),
        )
    }

    #[test]
    fn only_idempotent_statements_are_retried_after_an_unknown_outcome() {
        assert_eq!(
            decide(&timeout(WriteType::Simple), true),
            RetryDecision::RetrySameTarget(None),
            "the coordinator answered: its replicas were slow"
        );
        assert_eq!(
            decide(&timeout(WriteType::Simple), false),
            RetryDecision::DontRetry
        );
        assert_eq!(
            decide(&timeout(WriteType::Cas), true),
            RetryDecision::DontRetry,
            "an LWT's outcome is read back, never retried blindly"
        );
    }

    #[test]
    fn refusals_are_retried_whatever_the_statement() {
        let unavailable = RequestAttemptError::DbError(
            DbError::Unavailable {
                consistency: Consistency::LocalQuorum,
                required: 2,
                alive: 1,
            },
            "unavailable".into(),
        );
        let overloaded = RequestAttemptError::DbError(DbError::Overloaded, "busy".into());
        for e in [unavailable, overloaded] {
            assert_eq!(decide(&e, false), RetryDecision::RetryNextTarget(None));
        }
        let invalid = RequestAttemptError::DbError(DbError::Invalid, "bad".into());
        assert_eq!(decide(&invalid, true), RetryDecision::DontRetry);
    }
}
