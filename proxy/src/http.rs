//! HTTP proxying with hyper, as a small tower stack per connection:
//! [`observe::Observe`] (metrics, errors to synthetic responses) over
//! [`forward::Forward`] (hop-by-hop headers, pooled upstream connections, upgrades),
//! served by [`server::serve`] in the protocol detection found.

pub mod forward;
pub mod headers;
pub mod observe;
pub mod pool;
pub mod server;

pub use forward::{Body, Forward};
pub use observe::{Observe, ObserveLayer};
pub use pool::Pool;
