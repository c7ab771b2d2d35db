//! meshlet's benchmark tools: an open-loop HTTP/1.1 load generator that samples the
//! memory and CPU of the processes under test, a minimal upstream server, the floor
//! pair (a minimal mTLS L4 forwarder) and an HTTPS admission-webhook load generator.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod floor;
pub mod histogram;
pub mod loadgen;
pub mod procstat;
pub mod server;
mod timetable;
pub mod webhook;
