//! Shared state in existing engines: etcd for the registry (Redis for limits comes with
//! admission). Each client feeds a local view; nothing on the request path awaits them.

pub mod etcd;
pub mod etcd_conn;
pub mod redis;
