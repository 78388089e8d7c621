//! Support for tests and benchmarks that need real peers: a NATS cluster on loopback.
//! Not used by the daemon itself.

pub mod nats;
