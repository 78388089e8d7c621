//! zoomq: a durable, rate-limited delivery daemon for Zoom chat-bot message edits.
#![deny(unsafe_code)]

pub mod config;
pub mod metrics;
pub mod plan;
pub mod protocol;
pub mod queue;
pub mod sandbox;
