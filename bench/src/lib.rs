//! meshlet's benchmark tools: an open-loop HTTP/1.1 load generator that samples the
//! memory and CPU of the processes under test, and a minimal upstream server.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod histogram;
pub mod loadgen;
pub mod procstat;
pub mod server;
