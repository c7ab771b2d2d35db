//! HTTP proxying with hyper, as a small tower stack per connection:
//! [`observe::Observe`] (metrics, errors to synthetic responses) over
//! [`forward::Forward`] (hop-by-hop headers, pooled upstream connections, upgrades),
//! served by [`server::serve`] in the protocol detection found. Outbound connections
//! to a Service get the route stack: [`route::Route`] (HTTPRoutes) over `Observe` over
//! [`timeout`] (`timeouts.request`), [`retry::Retry`] (with [`replay`] bodies),
//! [`timeout`] (`timeouts.backendRequest`) and `Forward`.

pub mod forward;
pub mod headers;
pub mod observe;
pub mod pool;
pub mod replay;
pub mod retry;
pub mod route;
pub mod server;
pub mod timeout;

pub use forward::{Body, Forward};
pub use observe::{Observe, ObserveLayer};
pub use pool::Pool;
