//! A route's `[route.translate]` section: which protocol its callers speak and, for JSON,
//! the protos that say how to call the service.
//!
//! Owns: the file type, validation, and compiling protos / loading descriptor sets at
//! load time, so a bad proto fails `busbar check` and a reload, never a request.
//! Must not: hold run-time state; the compiled mapping is immutable and lives in the
//! config snapshot, swapped on reload like routes.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use prost_reflect::DescriptorPool;
use serde::Deserialize;
use toml::Spanned;

use super::model::ServiceConfig;
use super::validate::Validator;
use crate::translate::grpc_web::{GrpcWebSettings, DEFAULT_CORS_MAX_AGE};
use crate::translate::json_grpc::{JsonOptions, MetadataHeaders, StreamFormat, Transcoder};
use crate::translate::{descriptors, Translation};

/// Proto3 JSON parsers reject unknown fields by default (the spec's advice): a typo in a
/// field name is an error the caller sees, not a silently ignored value.
pub const DEFAULT_DENY_UNKNOWN_FIELDS: bool = true;
/// Proto3 JSON omits default-valued fields by default.
pub const DEFAULT_EMIT_DEFAULTS: bool = false;
/// grpc-gateway's `Grpc-Metadata-<name>`: a caller can tell metadata from the headers
/// proxies add, and a name cannot collide with `content-type` and the like.
pub const DEFAULT_INITIAL_METADATA: MetadataHeaders = MetadataHeaders::Prefixed;
/// NDJSON: every line is one message, readable as it arrives, and what busbar always did.
pub const DEFAULT_STREAM_FORMAT: StreamFormat = StreamFormat::Ndjson;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTranslateFile {
    /// `"json"` or `"grpc-web"`.
    pub from: Spanned<String>,
    #[serde(default)]
    pub protos: Vec<Spanned<String>>,
    #[serde(default)]
    pub include: Vec<Spanned<String>>,
    pub descriptor_set: Option<Spanned<String>>,
    #[serde(default)]
    pub services: Vec<Spanned<String>>,
    pub method: Option<Spanned<String>>,
    pub emit_defaults: Option<Spanned<bool>>,
    pub deny_unknown_fields: Option<Spanned<bool>>,
    #[serde(default)]
    pub cors_origins: Vec<Spanned<String>>,
    pub cors_max_age: Option<Spanned<String>>,
    /// `"prefixed"` (`Grpc-Metadata-<name>`, grpc-gateway) or `"plain"` (Envoy).
    pub initial_metadata: Option<Spanned<String>>,
    /// `"ndjson"`, `"ndjson-result"` (grpc-gateway) or `"json-array"` (Envoy).
    pub stream_format: Option<Spanned<String>>,
}

/// Protos compiled during one validation, by (protos, include paths): each set is
/// compiled once, and a broken proto is reported once however many routes name it.
#[derive(Default)]
pub(super) struct ProtoCache {
    compiled: HashMap<(Vec<PathBuf>, Vec<PathBuf>), Result<DescriptorPool, String>>,
    reported: HashSet<String>,
}

enum Compiled {
    Pool(DescriptorPool),
    /// The first time this error is seen: report it.
    Failed(String),
    /// An error already reported for another route.
    Reported,
}

impl Validator<'_> {
    fn compiled(&mut self, protos: Vec<PathBuf>, includes: Vec<PathBuf>) -> Compiled {
        let result = self
            .protos
            .compiled
            .entry((protos, includes))
            .or_insert_with_key(|(p, i)| descriptors::compile(p, i))
            .clone();
        match result {
            Ok(pool) => Compiled::Pool(pool),
            Err(e) if self.protos.reported.insert(e.clone()) => Compiled::Failed(e),
            Err(_) => Compiled::Reported,
        }
    }

    /// Validates and compiles one route's translation; `None` when it has none or on error.
    pub(super) fn route_translate(
        &mut self,
        f: Option<&RouteTranslateFile>,
        service: Option<&ServiceConfig>,
        ctx: &str,
    ) -> Option<Translation> {
        let f = f?;
        if let Some(svc) = service {
            if !svc.protocol.is_h2() {
                self.err(
                    f.from.span(),
                    ctx,
                    format!(
                        "translation calls gRPC, which needs HTTP/2: set protocol = \"h2c\" (or \"h2\" over TLS) on service \"{}\"",
                        svc.name
                    ),
                );
            }
        }
        match f.from.get_ref().as_str() {
            "json" => self.json_translate(f, ctx),
            "grpc-web" => {
                for k in [
                    &f.descriptor_set,
                    &f.method,
                    &f.initial_metadata,
                    &f.stream_format,
                ]
                .into_iter()
                .flatten()
                {
                    self.err(k.span(), ctx, "only applies to from = \"json\"");
                }
                if let Some(p) = f.protos.first().or(f.services.first()) {
                    self.err(
                        p.span(),
                        ctx,
                        "protos and services only apply to from = \"json\"",
                    );
                }
                for o in &f.cors_origins {
                    let v = o.get_ref();
                    if v != "*" && !(v.starts_with("http://") || v.starts_with("https://")) {
                        self.err(
                            o.span(),
                            ctx,
                            "a CORS origin is \"*\" or like \"https://app.example.com\"",
                        );
                    }
                }
                let cors_max_age = self.duration(&f.cors_max_age, ctx, DEFAULT_CORS_MAX_AGE);
                Some(Translation::GrpcWeb(Arc::new(GrpcWebSettings {
                    cors_origins: f.cors_origins.iter().map(|o| o.get_ref().clone()).collect(),
                    cors_max_age,
                })))
            }
            _ => {
                self.err(f.from.span(), ctx, "from must be \"json\" or \"grpc-web\"");
                None
            }
        }
    }

    fn json_translate(&mut self, f: &RouteTranslateFile, ctx: &str) -> Option<Translation> {
        if let Some(o) = f.cors_origins.first() {
            self.err(
                o.span(),
                ctx,
                "cors_origins only applies to from = \"grpc-web\"",
            );
        }
        let options = JsonOptions {
            emit_defaults: f
                .emit_defaults
                .as_ref()
                .map_or(DEFAULT_EMIT_DEFAULTS, |b| *b.get_ref()),
            deny_unknown_fields: f
                .deny_unknown_fields
                .as_ref()
                .map_or(DEFAULT_DENY_UNKNOWN_FIELDS, |b| *b.get_ref()),
            initial_metadata: match f.initial_metadata.as_ref() {
                None => DEFAULT_INITIAL_METADATA,
                Some(v) => match v.get_ref().as_str() {
                    "prefixed" => MetadataHeaders::Prefixed,
                    "plain" => MetadataHeaders::Plain,
                    _ => {
                        self.err(
                            v.span(),
                            ctx,
                            "initial_metadata must be \"prefixed\" or \"plain\"",
                        );
                        DEFAULT_INITIAL_METADATA
                    }
                },
            },
            stream: match f.stream_format.as_ref() {
                None => DEFAULT_STREAM_FORMAT,
                Some(v) => match v.get_ref().as_str() {
                    "ndjson" => StreamFormat::Ndjson,
                    "ndjson-result" => StreamFormat::ResultLines,
                    "json-array" => StreamFormat::JsonArray,
                    _ => {
                        self.err(
                            v.span(),
                            ctx,
                            "stream_format must be \"ndjson\", \"ndjson-result\" or \"json-array\"",
                        );
                        DEFAULT_STREAM_FORMAT
                    }
                },
            },
        };
        let pool = match (&f.descriptor_set, f.protos.is_empty()) {
            (Some(set), true) => {
                descriptors::decode_set(&self.path(set.get_ref())).map_err(|e| (set.span(), e))
            }
            (None, false) => {
                let protos: Vec<_> = f.protos.iter().map(|p| self.path(p.get_ref())).collect();
                let includes: Vec<_> = f.include.iter().map(|p| self.path(p.get_ref())).collect();
                match self.compiled(protos, includes) {
                    Compiled::Pool(p) => Ok(p),
                    Compiled::Failed(e) => Err((f.protos[0].span(), e)),
                    // Reported at the first route that named it; this route fails too.
                    Compiled::Reported => return None,
                }
            }
            (Some(set), false) => Err((
                set.span(),
                "set either protos or descriptor_set, not both".to_string(),
            )),
            (None, true) => Err((
                f.from.span(),
                "from = \"json\" needs protos = [\"file.proto\"] or descriptor_set = \"file.pb\""
                    .to_string(),
            )),
        };
        let pool = match pool {
            Ok(p) => p,
            Err((span, e)) => {
                self.err(span, ctx, e);
                return None;
            }
        };
        let built = match &f.method {
            Some(m) => {
                if let Some(s) = f.services.first() {
                    self.err(s.span(), ctx, "set either method or services, not both");
                }
                Transcoder::single(pool, m.get_ref(), options).map_err(|e| (m.span(), e))
            }
            None => {
                let services: Vec<String> =
                    f.services.iter().map(|s| s.get_ref().clone()).collect();
                let span = f.services.first().map_or(f.from.span(), |s| s.span());
                Transcoder::from_annotations(pool, &services, options).map_err(|e| (span, e))
            }
        };
        match built {
            Ok(t) => Some(Translation::Json(Arc::new(t))),
            Err((span, e)) => {
                self.err(span, ctx, e);
                None
            }
        }
    }
}

/// Route name → translation, for the routes that have one.
pub type Translations = HashMap<String, Translation>;
