//! The `fidelity.v1` service of `tests/protos/fidelity.proto`: replies with a field to
//! answer alone, metadata both ways, the standard `google.rpc` error details and server
//! streams that end well or badly, for busbar's JSON↔gRPC fidelity tests.

use std::net::SocketAddr;
use std::pin::Pin;

use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::metadata::{KeyAndValueRef, MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};

pub mod pb {
    tonic::include_proto!("fidelity.v1");
}

use pb::fidelity_server::{Fidelity, FidelityServer};
use pb::*;

/// The standard error details the `Details` method attaches, encoded by hand (the test
/// backend does not compile `google/rpc`).
mod rpc {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(message, repeated, tag = "3")]
        pub details: Vec<prost_types::Any>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ErrorInfo {
        #[prost(string, tag = "1")]
        pub reason: String,
        #[prost(string, tag = "2")]
        pub domain: String,
        #[prost(map = "string, string", tag = "3")]
        pub metadata: std::collections::HashMap<String, String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RetryInfo {
        #[prost(message, optional, tag = "1")]
        pub retry_delay: Option<prost_types::Duration>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FieldViolation {
        #[prost(string, tag = "1")]
        pub field: String,
        #[prost(string, tag = "2")]
        pub description: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct BadRequest {
        #[prost(message, repeated, tag = "1")]
        pub field_violations: Vec<FieldViolation>,
    }
}

fn any(name: &str, m: &impl Message) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/google.rpc.{name}"),
        value: m.encode_to_vec(),
    }
}

/// `x-trailer: t-value`, sent as trailers (or in a Trailers-Only reply).
fn trailer() -> MetadataMap {
    let mut md = MetadataMap::new();
    md.insert("x-trailer", MetadataValue::from_static("t-value"));
    md
}

struct Svc;

type ItemStream = Pin<Box<dyn Stream<Item = Result<Item, Status>> + Send>>;

#[tonic::async_trait]
impl Fidelity for Svc {
    async fn get_shelf(&self, req: Request<ShelfRequest>) -> Result<Response<ShelfReply>, Status> {
        let id = req.into_inner().id;
        Ok(Response::new(ShelfReply {
            // Shelf 0 has none: an unset message field.
            shelf: (id != 0).then(|| Shelf {
                id,
                theme: format!("theme {id}"),
            }),
            tags: vec!["a".into(), "b".into()],
            served_by: "fidelity".into(),
        }))
    }

    async fn metadata(
        &self,
        req: Request<MetadataRequest>,
    ) -> Result<Response<MetadataReply>, Status> {
        let mut seen: Vec<String> = req
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                KeyAndValueRef::Ascii(k, v) => Some(format!("{k}={}", v.to_str().unwrap_or(""))),
                _ => None,
            })
            .collect();
        seen.sort();
        let code = req.into_inner().code;
        if code != 0 {
            return Err(Status::with_metadata(
                Code::from(code),
                "failed on purpose",
                trailer(),
            ));
        }
        let mut resp = Response::new(MetadataReply { seen });
        resp.metadata_mut()
            .insert("x-initial", MetadataValue::from_static("i-value"));
        Ok(resp)
    }

    async fn details(
        &self,
        req: Request<DetailsRequest>,
    ) -> Result<Response<MetadataReply>, Status> {
        let code = req.into_inner().code;
        let status = rpc::Status {
            code,
            message: "details attached".into(),
            details: vec![
                any(
                    "ErrorInfo",
                    &rpc::ErrorInfo {
                        reason: "QUOTA_EXCEEDED".into(),
                        domain: "fidelity.test".into(),
                        metadata: [("limit".to_string(), "10".to_string())].into(),
                    },
                ),
                any(
                    "RetryInfo",
                    &rpc::RetryInfo {
                        retry_delay: Some(prost_types::Duration {
                            seconds: 3,
                            nanos: 0,
                        }),
                    },
                ),
                any(
                    "BadRequest",
                    &rpc::BadRequest {
                        field_violations: vec![rpc::FieldViolation {
                            field: "code".into(),
                            description: "must be odd".into(),
                        }],
                    },
                ),
            ],
        };
        Err(Status::with_details(
            Code::from(code),
            "details attached",
            status.encode_to_vec().into(),
        ))
    }

    type StreamStream = ItemStream;

    async fn stream(&self, req: Request<StreamRequest>) -> Result<Response<ItemStream>, Status> {
        let r = req.into_inner();
        let mut items: Vec<Result<Item, Status>> =
            (0..r.count.max(0)).map(|n| Ok(Item { n })).collect();
        // The end: the failure asked for, or OK with a trailer (tonic sends the metadata
        // of a status a stream yields as its trailers).
        items.push(Err(if r.fail_code != 0 {
            Status::new(Code::from(r.fail_code), "stream failed")
        } else {
            Status::with_metadata(Code::Ok, "", trailer())
        }));
        let mut resp = Response::new(Box::pin(tokio_stream::iter(items)) as ItemStream);
        resp.metadata_mut()
            .insert("x-initial", MetadataValue::from_static("i-value"));
        Ok(resp)
    }
}

/// A running `fidelity.v1` backend; stops when dropped.
pub struct FidelityBackend {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl FidelityBackend {
    /// Starts on 127.0.0.1 and a port the OS picks.
    pub async fn start() -> FidelityBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(FidelityServer::new(Svc))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = rx.await;
                    },
                )
                .await;
        });
        FidelityBackend {
            addr,
            stop: Some(tx),
        }
    }
}

impl Drop for FidelityBackend {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
