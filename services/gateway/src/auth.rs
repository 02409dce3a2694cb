//! Authentication: who is calling.
//!
//! A client logs in once per device (`Auth.Login`) with a credential that an
//! [`IdentityProvider`] turns into a user id; the gateway answers with a
//! session token bound to that user and device. Every other RPC carries the
//! token (`authorization: Bearer ...`); [`authenticate`] checks it and puts
//! the [`Identity`] into the request's extensions, where handlers read it.
//!
//! Session tokens are `base64url(v1|user|device|expiry_ms) . base64url(HMAC-SHA256)`
//! under a secret of the deployment ([`SessionKeys`]).

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chappe_proto::ids::{DeviceId, UserId};
use chappe_proto::v1::{DeviceRef, login_request};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::{Request, Status};

type HmacSha256 = Hmac<Sha256>;

/// The authenticated device behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    pub device: DeviceId,
}

impl Identity {
    pub fn to_wire(&self) -> DeviceRef {
        DeviceRef {
            user_id: self.user.to_string(),
            device_id: self.device.to_string(),
        }
    }

    /// The identity the interceptor attached to `request`.
    pub fn of<T>(request: &Request<T>) -> Result<Identity, Status> {
        request
            .extensions()
            .get::<Identity>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no session"))
    }
}

/// Turns a login credential into a user id.
#[async_trait]
pub trait IdentityProvider: Send + Sync + 'static {
    async fn authenticate(&self, credential: &login_request::Credential) -> Result<UserId, Status>;
}

/// The development issuer of `chappe up`: believes the user id it is given.
/// Never enable it where real users connect.
#[derive(Debug, Default)]
pub struct DevIdentityProvider;

#[async_trait]
impl IdentityProvider for DevIdentityProvider {
    async fn authenticate(&self, credential: &login_request::Credential) -> Result<UserId, Status> {
        match credential {
            login_request::Credential::Dev(dev) => UserId::parse(dev.user_id.clone())
                .map_err(|e| Status::invalid_argument(e.to_string())),
            login_request::Credential::OidcIdToken(_) => Err(Status::unimplemented(
                "OIDC login is not configured on this gateway",
            )),
        }
    }
}

/// The secret that signs and checks session tokens.
pub struct SessionKeys {
    secret: [u8; 32],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed session token")]
    Malformed,
    #[error("session token signature is invalid")]
    BadSignature,
    #[error("session token expired")]
    Expired,
}

impl SessionKeys {
    pub fn new(secret: [u8; 32]) -> Self {
        Self { secret }
    }

    /// Reads a 32-byte secret from `path`, shared by every gateway of a
    /// deployment so that a token from one is good on the others.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        let secret: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} must hold exactly 32 bytes", path.display()),
            )
        })?;
        Ok(Self::new(secret))
    }

    /// Like [`SessionKeys::load`]; a missing file is created with a new
    /// random secret, readable by its owner only.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        match Self::load(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret: [u8; 32] = rand::random();
                write_private(path, &secret)?;
                Ok(Self::new(secret))
            }
            other => other,
        }
    }

    pub fn random() -> Self {
        Self::new(rand::random())
    }

    fn mac(&self, payload: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length: this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(payload);
        mac
    }

    /// A token for `identity`, valid for `ttl`; returns it with its expiry.
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> (String, u64) {
        let expires = (chappe_proto::ids::unix_ms().max(0) as u64) + ttl.as_millis() as u64;
        let payload = format!("v1|{}|{}|{expires}", identity.user, identity.device);
        let tag = self.mac(payload.as_bytes()).finalize().into_bytes();
        let token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(tag)
        );
        (token, expires)
    }

    /// The identity a token vouches for.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        let (payload, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        self.mac(&payload)
            .verify_slice(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        let payload = String::from_utf8(payload).map_err(|_| TokenError::Malformed)?;
        let mut parts = payload.split('|');
        let (Some("v1"), Some(user), Some(device), Some(expires), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        let expires: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        if expires <= (chappe_proto::ids::unix_ms().max(0) as u64) {
            return Err(TokenError::Expired);
        }
        Ok(Identity {
            user: UserId::parse(user).map_err(|_| TokenError::Malformed)?,
            device: DeviceId::parse(device).map_err(|_| TokenError::Malformed)?,
        })
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Refuses every login: a gateway with no identity provider configured
/// (OIDC is not built yet; development logins must be asked for).
#[derive(Debug, Default)]
pub struct NoIdentityProvider;

#[async_trait]
impl IdentityProvider for NoIdentityProvider {
    async fn authenticate(&self, _: &login_request::Credential) -> Result<UserId, Status> {
        Err(Status::unimplemented(
            "no identity provider is configured on this gateway",
        ))
    }
}

/// The interceptor: checks the bearer token and attaches the [`Identity`].
pub fn authenticate(keys: &SessionKeys, mut request: Request<()>) -> Result<Request<()>, Status> {
    let header = request
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization metadata"))?;
    let token = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization must be 'Bearer <token>'"))?;
    let identity = keys
        .verify(token)
        .map_err(|e| Status::unauthenticated(e.to_string()))?;
    request.extensions_mut().insert(identity);
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Identity {
        Identity {
            user: UserId::parse("alice").unwrap(),
            device: DeviceId::parse("laptop").unwrap(),
        }
    }

    #[test]
    fn tokens_round_trip_and_refuse_tampering() {
        let keys = SessionKeys::random();
        let (token, _) = keys.issue(&alice(), Duration::from_secs(60));
        assert_eq!(keys.verify(&token), Ok(alice()));

        let other = SessionKeys::random();
        assert_eq!(other.verify(&token), Err(TokenError::BadSignature));

        let (payload, tag) = token.split_once('.').unwrap();
        let forged = URL_SAFE_NO_PAD.encode(
            String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap())
                .unwrap()
                .replace("alice", "mallory"),
        );
        assert_eq!(
            keys.verify(&format!("{forged}.{tag}")),
            Err(TokenError::BadSignature)
        );
        assert_eq!(keys.verify("garbage"), Err(TokenError::Malformed));
        let (expired, _) = keys.issue(&alice(), Duration::ZERO);
        assert_eq!(keys.verify(&expired), Err(TokenError::Expired));
    }
}
