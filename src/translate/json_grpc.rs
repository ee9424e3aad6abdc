//! JSON/HTTP ↔ gRPC transcoding: which method a request calls, the request message
//! built from path, query and JSON body, and the JSON made from the reply.
//!
//! Owns: bindings from `google.api.http` annotations (or one explicit method, and a
//! rule's `response_body`), proto3 JSON via prost-reflect, typed conversion of path and
//! query text, splitting a client-streaming body (JSON array or NDJSON) into messages,
//! and the route's response options (metadata headers, stream format).
//! Must not: do I/O (the call itself is `drivers::json_grpc`), or panic on anything a client sends.

use std::collections::HashSet;

use bytes::{BufMut, Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::Method;
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
    MethodDescriptor, SerializeOptions, Value as PValue,
};
use serde_json::{Map, Value};

use super::template::{Binding as PathBinding, PathTemplate};

/// Where the HTTP body goes in the request message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// `body: "*"`: the whole message; query parameters are ignored.
    All,
    /// `body: "field"`: one field; other fields come from the path and the query.
    Field(String),
    /// No body: fields come from the path and the query.
    None,
}

/// One HTTP verb + path template bound to a gRPC method.
#[derive(Debug, Clone)]
pub struct Binding {
    pub http_method: Method,
    /// `None`: any path of the route (an explicit `method = …` mapping).
    pub template: Option<PathTemplate>,
    pub method: MethodDescriptor,
    pub body: Body,
    /// `response_body: "field"`: the reply's field answered instead of the whole reply.
    pub response_body: Option<FieldDescriptor>,
    /// `/package.Service/Method`.
    pub grpc_path: String,
    /// `grpc_path` as the request target, parsed once when the config loads.
    pub grpc_target: PathAndQuery,
}

/// JSON options of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonOptions {
    /// Emit fields that hold their default value (proto3 JSON omits them by default).
    pub emit_defaults: bool,
    /// Refuse JSON keys and query parameters that name no field.
    pub deny_unknown_fields: bool,
    /// How the reply's initial metadata reaches the caller.
    pub initial_metadata: MetadataHeaders,
    /// How a server stream is written.
    pub stream: StreamFormat,
}

/// How gRPC initial metadata becomes response headers (trailers always become
/// `Grpc-Trailer-<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataHeaders {
    /// `Grpc-Metadata-<name>`, as grpc-gateway sends them.
    Prefixed,
    /// Under their own names, as Envoy's transcoder passes them.
    Plain,
}

/// How a server-streaming reply is written to a JSON caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFormat {
    /// One message per line (`application/x-ndjson`); an error ends it as
    /// `{"error": {…}}`.
    Ndjson,
    /// grpc-gateway's lines: `{"result": message}`, and `{"error": {…}}` at a failure.
    ResultLines,
    /// Envoy's transcoder: one JSON array of the messages (`application/json`).
    JsonArray,
}

/// A route's compiled JSON→gRPC mapping; lives in the config snapshot.
#[derive(Debug)]
pub struct Transcoder {
    pub pool: DescriptorPool,
    pub bindings: Vec<Binding>,
    pub options: JsonOptions,
}

/// Why a request can't be transcoded; each maps to a status and a JSON error body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TranscodeError {
    /// No binding for this verb and path: 404.
    #[error("no gRPC method is bound to {0}")]
    NoMethod(String),
    /// Bidi streaming: 501.
    #[error("{0} is a bidi-streaming method; it can only be called over gRPC, not through JSON translation")]
    Streaming(String),
    /// The JSON or a parameter does not fit the message: 400, naming the field.
    #[error("{0}")]
    BadRequest(String),
}

impl TranscodeError {
    /// (HTTP status, gRPC code) of the error.
    pub fn status(&self) -> (u16, u32) {
        match self {
            TranscodeError::NoMethod(_) => (404, 5),
            TranscodeError::Streaming(_) => (501, 12),
            TranscodeError::BadRequest(_) => (400, 3),
        }
    }
}

fn http_rule_method(rule: &DynamicMessage) -> Option<(Method, String)> {
    for verb in ["get", "put", "post", "delete", "patch"] {
        if rule.has_field_by_name(verb) {
            let path = rule.get_field_by_name(verb)?.as_str()?.to_string();
            return Some((
                Method::from_bytes(verb.to_ascii_uppercase().as_bytes()).ok()?,
                path,
            ));
        }
    }
    if rule.has_field_by_name("custom") {
        let custom = rule.get_field_by_name("custom")?;
        let custom = custom.as_message()?;
        let kind = custom.get_field_by_name("kind")?.as_str()?.to_string();
        let path = custom.get_field_by_name("path")?.as_str()?.to_string();
        return Some((Method::from_bytes(kind.as_bytes()).ok()?, path));
    }
    None
}

fn str_field(m: &DynamicMessage, name: &str) -> String {
    m.get_field_by_name(name)
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn grpc_path(m: &MethodDescriptor) -> String {
    format!("/{}/{}", m.parent_service().full_name(), m.name())
}

/// The method's path as a request target.
fn grpc_target(m: &MethodDescriptor) -> Result<PathAndQuery, String> {
    PathAndQuery::try_from(grpc_path(m))
        .map_err(|e| format!("{}: not a request path: {e}", m.full_name()))
}

impl Transcoder {
    /// Bindings from the `google.api.http` annotations of `services` (all services in the
    /// pool when empty). Methods without an annotation are skipped.
    pub fn from_annotations(
        pool: DescriptorPool,
        services: &[String],
        options: JsonOptions,
    ) -> Result<Transcoder, String> {
        let ext = pool.get_extension_by_name("google.api.http");
        let mut bindings = Vec::new();
        let mut found = HashSet::new();
        for svc in pool.services() {
            if !services.is_empty() && !services.iter().any(|s| s == svc.full_name()) {
                continue;
            }
            found.insert(svc.full_name().to_string());
            let Some(ext) = &ext else { continue };
            for m in svc.methods() {
                let opts = m.options();
                if !opts.has_extension(ext) {
                    continue;
                }
                let rule = opts.get_extension(ext);
                let Some(rule) = rule.as_message() else {
                    continue;
                };
                let mut rules = vec![rule.clone()];
                if let Some(PValue::List(extra)) =
                    rule.get_field_by_name("additional_bindings").as_deref()
                {
                    rules.extend(extra.iter().filter_map(|v| v.as_message().cloned()));
                }
                for r in rules {
                    let (http_method, path) = http_rule_method(&r).ok_or_else(|| {
                        format!("{}: google.api.http rule has no verb", m.full_name())
                    })?;
                    let template = PathTemplate::parse(&path)
                        .map_err(|e| format!("{}: {e}", m.full_name()))?;
                    let input = m.input();
                    for f in template.bound() {
                        field_at(&input, f).map_err(|e| {
                            format!("{}: path template \"{path}\": {e}", m.full_name())
                        })?;
                    }
                    let body = match str_field(&r, "body").as_str() {
                        "" => Body::None,
                        "*" => Body::All,
                        f => {
                            if input.get_field_by_name(f).is_none() {
                                return Err(format!(
                                    "{}: body \"{f}\" is not a field of {}",
                                    m.full_name(),
                                    input.full_name()
                                ));
                            }
                            Body::Field(f.to_string())
                        }
                    };
                    let response_body = match str_field(&r, "response_body").as_str() {
                        "" => None,
                        f => Some(m.output().get_field_by_name(f).ok_or_else(|| {
                            format!(
                                "{}: response_body \"{f}\" is not a field of {}",
                                m.full_name(),
                                m.output().full_name()
                            )
                        })?),
                    };
                    bindings.push(Binding {
                        http_method,
                        template: Some(template),
                        grpc_path: grpc_path(&m),
                        grpc_target: grpc_target(&m)?,
                        method: m.clone(),
                        body,
                        response_body,
                    });
                }
            }
        }
        if let Some(missing) = services.iter().find(|s| !found.contains(*s)) {
            return Err(format!("service {missing} is not in the compiled protos"));
        }
        if bindings.is_empty() {
            return Err(
                "no method has a google.api.http annotation: annotate the protos or set `method = \"package.Service/Method\"`"
                    .to_string(),
            );
        }
        Ok(Transcoder {
            pool,
            bindings,
            options,
        })
    }

    /// One method for every request of the route: the body is the whole message for
    /// verbs with a body, query parameters fill the fields otherwise.
    pub fn single(
        pool: DescriptorPool,
        method: &str,
        options: JsonOptions,
    ) -> Result<Transcoder, String> {
        let (svc, name) = method
            .split_once('/')
            .ok_or_else(|| format!("method \"{method}\" must be \"package.Service/Method\""))?;
        let service = pool
            .get_service_by_name(svc)
            .ok_or_else(|| format!("service {svc} is not in the compiled protos"))?;
        let m = service
            .methods()
            .find(|m| m.name() == name)
            .ok_or_else(|| format!("service {svc} has no method {name}"))?;
        let mut bindings = Vec::new();
        for (verb, body) in [
            (Method::POST, Body::All),
            (Method::PUT, Body::All),
            (Method::PATCH, Body::All),
            (Method::GET, Body::None),
            (Method::DELETE, Body::None),
        ] {
            bindings.push(Binding {
                http_method: verb,
                template: None,
                grpc_path: grpc_path(&m),
                grpc_target: grpc_target(&m)?,
                method: m.clone(),
                body,
                response_body: None,
            });
        }
        Ok(Transcoder {
            pool,
            bindings,
            options,
        })
    }

    /// The binding for a request and the values its path binds.
    pub fn find(
        &self,
        method: &Method,
        path: &str,
    ) -> Result<(&Binding, Vec<PathBinding>), TranscodeError> {
        for b in &self.bindings {
            if b.http_method != *method {
                continue;
            }
            let vars = match &b.template {
                None => Vec::new(),
                Some(t) => match t.matches(path) {
                    Some(v) => v,
                    None => continue,
                },
            };
            if b.method.is_client_streaming() && b.method.is_server_streaming() {
                return Err(TranscodeError::Streaming(b.method.full_name().to_string()));
            }
            return Ok((b, vars));
        }
        Err(TranscodeError::NoMethod(format!("{method} {path}")))
    }

    /// The encoded request message: body, then path variables, then query parameters.
    pub fn request(
        &self,
        b: &Binding,
        vars: Vec<PathBinding>,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<Vec<u8>, TranscodeError> {
        Ok(self.message(b, vars, query, body)?.encode_to_vec())
    }

    /// [`Transcoder::request`]'s message as one uncompressed gRPC frame, its 5-byte
    /// prefix and the message encoded into one buffer (no second copy).
    pub fn request_frame(
        &self,
        b: &Binding,
        vars: Vec<PathBinding>,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<Bytes, TranscodeError> {
        let msg = self.message(b, vars, query, body)?;
        // The message is encoded after a 5-byte gap, then its length written in it:
        // sizing it first (`encoded_len`) walks the whole message once more. Protobuf
        // is seldom longer than the JSON it came from; if it is, the buffer grows.
        let mut frame = BytesMut::with_capacity(5 + body.len() + 16);
        frame.put_bytes(0, 5);
        msg.encode_raw(&mut frame);
        let prefix = u32::try_from(frame.len() - 5).map_err(|_| {
            TranscodeError::BadRequest("the request message is over 4 GiB".to_string())
        })?;
        if let Some(at) = frame.get_mut(1..5) {
            at.copy_from_slice(&prefix.to_be_bytes());
        }
        Ok(frame.freeze())
    }

    /// The request message: body, then path variables, then query parameters.
    fn message(
        &self,
        b: &Binding,
        vars: Vec<PathBinding>,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<DynamicMessage, TranscodeError> {
        // The body is the whole message and nothing else sets a field (a POST of one
        // object, the common call): read straight from the text into the message, with
        // no `Value` tree between. Whatever this refuses is read again the long way,
        // whose error names the field. (Keys are read in the body's order, not sorted:
        // a field given twice, once by each of its names, takes the later value.)
        let first = body.iter().find(|c| !c.is_ascii_whitespace());
        if matches!(b.body, Body::All) && vars.is_empty() && first == Some(&b'{') {
            let opts =
                DeserializeOptions::new().deny_unknown_fields(self.options.deny_unknown_fields);
            let mut de = serde_json::Deserializer::from_slice(body);
            let input = b.method.input();
            if let Ok(msg) = DynamicMessage::deserialize_with_options(input, &mut de, &opts) {
                if de.end().is_ok() {
                    return Ok(msg);
                }
            }
        }
        self.message_via_value(b, vars, query, body)
    }

    /// [`Transcoder::message`] through a JSON `Value`: the body (parsed, or put in its
    /// field), the path's and the query's values set in it, then read into the message
    /// with the failing field's path tracked for the error.
    fn message_via_value(
        &self,
        b: &Binding,
        vars: Vec<PathBinding>,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<DynamicMessage, TranscodeError> {
        let input = b.method.input();
        let bad = TranscodeError::BadRequest;
        let has_body = body.iter().any(|c| !c.is_ascii_whitespace());
        let parsed: Option<Value> = match (&b.body, has_body) {
            (Body::None, _) | (_, false) => None,
            _ => Some(
                serde_json::from_slice(body)
                    .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?,
            ),
        };
        let mut obj = match (&b.body, parsed) {
            (Body::All, Some(Value::Object(m))) => m,
            (Body::All, Some(_)) => {
                return Err(bad(format!(
                    "the body must be a JSON object ({})",
                    input.full_name()
                )))
            }
            (Body::Field(f), Some(v)) => {
                let mut m = Map::new();
                m.insert(f.clone(), v);
                m
            }
            _ => Map::new(),
        };
        let mut bound: Vec<Vec<String>> = Vec::new();
        for (path, raw) in vars {
            set_field(&mut obj, &input, &path, &raw, false)
                .map_err(|e| bad(format!("path parameter \"{}\": {e}", path.join("."))))?;
            bound.push(path);
        }
        if b.body != Body::All {
            for (k, v) in query_pairs(query.unwrap_or("")) {
                let path: Vec<String> = k.split('.').map(str::to_string).collect();
                if bound.contains(&path) {
                    continue;
                }
                if let Body::Field(f) = &b.body {
                    if path.first() == Some(f) {
                        continue;
                    }
                }
                match set_field(&mut obj, &input, &path, &v, true) {
                    Ok(()) => {}
                    Err(FieldError::Unknown(_)) if !self.options.deny_unknown_fields => {}
                    Err(e) => return Err(bad(format!("query parameter \"{k}\": {e}"))),
                }
            }
        }
        let opts = DeserializeOptions::new().deny_unknown_fields(self.options.deny_unknown_fields);
        let mut track = serde_path_to_error::Track::new();
        let de = serde_path_to_error::Deserializer::new(Value::Object(obj), &mut track);
        DynamicMessage::deserialize_with_options(input, de, &opts).map_err(|e| {
            let path = track.path().to_string();
            if path == "." || path.is_empty() {
                bad(format!("invalid request: {e}"))
            } else {
                bad(format!("invalid value for field \"{path}\": {e}"))
            }
        })
    }

    /// The JSON for one reply message of `b`'s method (its `response_body` field only,
    /// when the binding names one).
    pub fn response(&self, b: &Binding, message: &[u8]) -> Result<Vec<u8>, String> {
        let msg = DynamicMessage::decode(b.method.output(), message).map_err(|e| {
            format!(
                "the reply is not a valid {}: {e}",
                b.method.output().full_name()
            )
        })?;
        let opts = SerializeOptions::new().skip_default_fields(!self.options.emit_defaults);
        let mut out = Vec::with_capacity(message.len() * 2 + 16);
        let mut ser = serde_json::Serializer::new(&mut out);
        let written = match &b.response_body {
            None => msg.serialize_with_options(&mut ser, &opts),
            Some(f) => match msg.get_field(f).as_ref() {
                // A singular message field: written directly (an unset one is `{}`).
                PValue::Message(m) if !f.is_list() && !f.is_map() => {
                    m.serialize_with_options(&mut ser, &opts)
                }
                // Scalars, lists and maps have no serializer of their own: the field
                // is taken from the whole reply, defaults included so it is never absent.
                _ => {
                    let whole = msg.serialize_with_options(
                        serde_json::value::Serializer,
                        &SerializeOptions::new().skip_default_fields(false),
                    );
                    let field = match whole {
                        Ok(Value::Object(mut o)) => o.remove(f.json_name()),
                        _ => None,
                    };
                    serde::Serialize::serialize(&field.unwrap_or(Value::Null), &mut ser)
                }
            },
        };
        written.map_err(|e| format!("the reply cannot be written as JSON: {e}"))?;
        Ok(out)
    }
}

/// Splits a client-streaming request body into its messages as the body arrives: a JSON
/// array of objects (as Envoy's transcoder takes it) or objects one after another,
/// newline-delimited (NDJSON). Nothing is parsed here but the nesting; each message is
/// then read by [`Transcoder::request`].
#[derive(Debug, Default)]
pub struct MessageSplitter {
    buf: Vec<u8>,
    /// Where the message being read starts in `buf`, while one is open.
    start: Option<usize>,
    depth: u32,
    in_string: bool,
    escaped: bool,
    form: Form,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// Nothing but whitespace yet.
    #[default]
    Unknown,
    Array,
    Lines,
    /// The array's `]` was read: only whitespace may follow.
    Closed,
}

impl MessageSplitter {
    /// Feeds the next piece of the body; complete messages are appended to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Vec<u8>>) -> Result<(), TranscodeError> {
        let bad = |what: &str| {
            TranscodeError::BadRequest(format!(
                "a client-streaming body is a JSON array of objects or one object per line: {what}"
            ))
        };
        let from = self.buf.len();
        self.buf.extend_from_slice(chunk);
        for i in from..self.buf.len() {
            let Some(&c) = self.buf.get(i) else { break };
            if self.in_string {
                match (self.escaped, c) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match c {
                b'"' if self.depth > 0 => self.in_string = true,
                b'{' | b'[' if self.depth > 0 => self.depth += 1,
                b'}' | b']' if self.depth > 0 => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        let start = self.start.take().unwrap_or(i);
                        out.push(self.buf.get(start..=i).unwrap_or_default().to_vec());
                    }
                }
                _ if self.depth > 0 => {}
                b' ' | b'\t' | b'\r' | b'\n' => {}
                _ if self.form == Form::Closed => return Err(bad("text after the array")),
                b'[' if self.form == Form::Unknown => self.form = Form::Array,
                b',' if self.form == Form::Array => {}
                b']' if self.form == Form::Array => self.form = Form::Closed,
                b'{' => {
                    if self.form == Form::Unknown {
                        self.form = Form::Lines;
                    }
                    self.start = Some(i);
                    self.depth = 1;
                }
                _ => return Err(bad("each message must be a JSON object")),
            }
        }
        // Keep only the open message.
        let keep = self.start.unwrap_or(self.buf.len());
        self.buf.drain(..keep);
        if let Some(s) = self.start.as_mut() {
            *s = 0;
        }
        Ok(())
    }

    /// The body ended: an open message or array is an error.
    pub fn finish(&self) -> Result<(), TranscodeError> {
        if self.depth > 0 || self.form == Form::Array {
            return Err(TranscodeError::BadRequest(
                "the client-streaming body ends inside a message or before the array's ]"
                    .to_string(),
            ));
        }
        Ok(())
    }
}

/// Why a path or query value could not be set.
#[derive(Debug, thiserror::Error)]
enum FieldError {
    #[error("{0} names no field")]
    Unknown(String),
    #[error("{0}")]
    Invalid(String),
}

fn lookup(desc: &MessageDescriptor, name: &str) -> Option<prost_reflect::FieldDescriptor> {
    desc.get_field_by_name(name)
        .or_else(|| desc.get_field_by_json_name(name))
}

/// The field a dotted path names; every step but the last must be a singular message.
fn field_at(
    desc: &MessageDescriptor,
    path: &[String],
) -> Result<prost_reflect::FieldDescriptor, String> {
    let mut d = desc.clone();
    let (last, parents) = path.split_last().ok_or("empty field path")?;
    for p in parents {
        let f = lookup(&d, p).ok_or_else(|| format!("{p} is not a field of {}", d.full_name()))?;
        match f.kind() {
            Kind::Message(m) if !f.is_list() && !f.is_map() => d = m,
            _ => return Err(format!("{p} is not a message field")),
        }
    }
    lookup(&d, last).ok_or_else(|| format!("{last} is not a field of {}", d.full_name()))
}

/// Puts a text value at a field path of the JSON object, converted to the JSON the
/// field's type takes (`"true"` → `true` for bools, numbers as proto3 JSON strings).
fn set_field(
    obj: &mut Map<String, Value>,
    desc: &MessageDescriptor,
    path: &[String],
    raw: &str,
    append: bool,
) -> Result<(), FieldError> {
    let Some((last, parents)) = path.split_last() else {
        return Err(FieldError::Unknown(String::new()));
    };
    let mut d = desc.clone();
    let mut o = obj;
    for p in parents {
        let f = lookup(&d, p).ok_or_else(|| FieldError::Unknown(p.clone()))?;
        let Kind::Message(m) = f.kind() else {
            return Err(FieldError::Invalid(format!("{p} is not a message field")));
        };
        if f.is_list() || f.is_map() {
            return Err(FieldError::Invalid(format!("{p} is repeated")));
        }
        d = m;
        if f.json_name() != f.name() {
            if let Some(v) = o.remove(f.json_name()) {
                o.insert(f.name().to_string(), v);
            }
        }
        let entry = o
            .entry(f.name().to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(next) = entry else {
            return Err(FieldError::Invalid(format!("{p} is not an object")));
        };
        o = next;
    }
    let f = lookup(&d, last).ok_or_else(|| FieldError::Unknown(last.clone()))?;
    if f.is_map() {
        return Err(FieldError::Invalid(format!(
            "{last} is a map; set it in the JSON body"
        )));
    }
    let v = scalar_json(&f.kind(), raw).map_err(FieldError::Invalid)?;
    if f.json_name() != f.name() {
        o.remove(f.json_name());
    }
    if f.is_list() {
        let slot = o
            .entry(f.name().to_string())
            .or_insert_with(|| Value::Array(Vec::new()));
        match slot {
            Value::Array(a) if append => a.push(v),
            _ => *slot = Value::Array(vec![v]),
        }
    } else {
        o.insert(f.name().to_string(), v);
    }
    Ok(())
}

fn parse_bool(raw: &str) -> Result<Value, String> {
    match raw {
        "true" | "1" => Ok(Value::Bool(true)),
        "false" | "0" => Ok(Value::Bool(false)),
        _ => Err(format!("\"{raw}\" is not a bool (true or false)")),
    }
}

fn scalar_json(kind: &Kind, raw: &str) -> Result<Value, String> {
    match kind {
        Kind::Bool => parse_bool(raw),
        Kind::Enum(_) => Ok(match raw.parse::<i32>() {
            Ok(n) => Value::from(n),
            Err(_) => Value::String(raw.to_string()),
        }),
        Kind::Double | Kind::Float => Ok(match raw.parse::<f64>() {
            Ok(n) if n.is_finite() => Value::from(n),
            _ => Value::String(raw.to_string()),
        }),
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.BoolValue" => parse_bool(raw),
            "google.protobuf.DoubleValue" | "google.protobuf.FloatValue" => {
                scalar_json(&Kind::Double, raw)
            }
            n if n.starts_with("google.protobuf.") => Ok(Value::String(raw.to_string())),
            n => Err(format!(
                "a {n} message cannot be set from text; use the JSON body"
            )),
        },
        // Integers, strings and bytes: proto3 JSON takes them as strings.
        _ => Ok(Value::String(raw.to_string())),
    }
}

/// `a=1&b=x%20y&b=z` → pairs, percent- and `+`-decoded; broken pairs are skipped.
fn query_pairs(q: &str) -> impl Iterator<Item = (String, String)> + '_ {
    q.split('&').filter(|p| !p.is_empty()).filter_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        let dec = |s: &str| {
            let s = s.replace('+', " ");
            percent_encoding::percent_decode_str(&s)
                .decode_utf8()
                .ok()
                .map(|c| c.into_owned())
        };
        Some((dec(k)?, dec(v)?))
    })
}

#[cfg(test)]
#[path = "json_grpc_tests.rs"]
mod tests;
