//! The kernel fast path: the XDP guard and in-kernel forwarding of learned
//! flows ([`kernel`]), and the routing and neighbour tables it resolves
//! next hops with ([`netinfo`]).

pub mod kernel;
pub mod netinfo;

pub use kernel::KernelPath;
