//! The `chappe.v1` wire API: generated protobuf types and gRPC stubs, plus
//! the few things every side of the wire must agree on byte for byte.
//!
//! - [`v1`]: the public, client-facing API (`Auth`, `Gateway`, shared types);
//! - [`internal`]: payloads that services exchange over the bus;
//! - [`ids`]: validated identifiers (`UserId`, `DeviceId`, `ConversationId`, `MessageId`);
//! - [`signing`]: the exact bytes that devices sign and servers verify;
//! - [`codec`]: the gRPC codec, which answers a malformed frame with
//!   `INVALID_ARGUMENT` rather than gRPC's default `INTERNAL`.

pub mod codec;
pub mod ids;
pub mod signing;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("chappe.v1");

    #[allow(clippy::all, missing_docs)]
    pub mod internal {
        tonic::include_proto!("chappe.v1.internal");
    }
}

pub use v1::internal;
