//! zoomq's integration tests: the real `zoomq` binary, a real Unix socket, and the sandbox
//! (a fake Zoom over real HTTP on loopback). One test binary, one module per concern.

mod helpers;

mod cluster;
mod cluster_crash;
mod cluster_handover;
mod config_errors;
mod crash;
mod crash_lifecycle;
mod delivery;
mod demo;
mod faults;
mod ingest;
mod lifecycle;
mod operator_view;
mod shutdown;
