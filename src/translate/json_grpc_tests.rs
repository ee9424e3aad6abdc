//! Transcoder tests against the test proto (compiled here with protox).

use super::*;
use serde_json::json;

fn transcoder(deny_unknown_fields: bool) -> Transcoder {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let pool =
        crate::translate::descriptors::compile(&[root.join("tests/protos/bookstore.proto")], &[])
            .unwrap();
    Transcoder::from_annotations(
        pool,
        &[],
        JsonOptions {
            emit_defaults: false,
            deny_unknown_fields,
            initial_metadata: MetadataHeaders::Prefixed,
            stream: StreamFormat::Ndjson,
        },
    )
    .unwrap()
}

/// The request message as proto3 JSON, for comparison.
fn req_json(
    t: &Transcoder,
    method: Method,
    path: &str,
    query: Option<&str>,
    body: &str,
) -> Result<Value, TranscodeError> {
    let (b, vars) = t.find(&method, path)?;
    let bytes = t.request(b, vars, query, body.as_bytes())?;
    let msg = DynamicMessage::decode(b.method.input(), bytes.as_slice()).unwrap();
    Ok(serde_json::to_value(&msg).unwrap())
}

#[test]
fn path_and_query_fill_typed_fields() {
    let t = transcoder(true);
    let v = req_json(
        &t,
        Method::GET,
        "/v1/shelves/3/books/42",
        Some("with_reviews=true&tags=a&tags=b%20c&genre=POETRY"),
        "",
    )
    .unwrap();
    assert_eq!(
        v,
        json!({"shelf": "3", "id": "42", "withReviews": true, "tags": ["a", "b c"], "genre": "POETRY"})
    );
    // The additional binding, camelCase query names.
    let v = req_json(
        &t,
        Method::GET,
        "/v1/books/7",
        Some("withReviews=false&genre=2"),
        "",
    )
    .unwrap();
    assert_eq!(v, json!({"id": "7", "genre": "SCIENCE"}));
}

#[test]
fn body_field_and_nested_path_variables() {
    let t = transcoder(true);
    let v = req_json(
        &t,
        Method::POST,
        "/v1/shelves/9/books",
        None,
        r#"{"title":"T","page_count":"12"}"#,
    )
    .unwrap();
    assert_eq!(
        v,
        json!({"shelf": "9", "book": {"title": "T", "pageCount": "12"}})
    );
    let v = req_json(
        &t,
        Method::PUT,
        "/v1/books/77",
        None,
        r#"{"id":"1","title":"T"}"#,
    )
    .unwrap();
    assert_eq!(
        v,
        json!({"book": {"id": "77", "title": "T"}}),
        "the path wins"
    );
}

#[test]
fn bad_input_names_the_field() {
    let t = transcoder(true);
    let e = req_json(&t, Method::POST, "/v1/echo", None, r#"{"id": "x1"}"#).unwrap_err();
    assert!(
        matches!(&e, TranscodeError::BadRequest(m) if m.contains("\"id\"")),
        "{e}"
    );
    let e = req_json(
        &t,
        Method::POST,
        "/v1/echo",
        None,
        r#"{"author": {"born": "old"}}"#,
    )
    .unwrap_err();
    assert!(
        matches!(&e, TranscodeError::BadRequest(m) if m.contains("author.born")),
        "{e}"
    );
    let e = req_json(&t, Method::POST, "/v1/echo", None, r#"{"titel": "x"}"#).unwrap_err();
    assert!(
        matches!(&e, TranscodeError::BadRequest(m) if m.contains("titel")),
        "{e}"
    );
    let e = req_json(&t, Method::POST, "/v1/echo", None, r#"{"id": 1"#).unwrap_err();
    assert!(
        matches!(&e, TranscodeError::BadRequest(m) if m.contains("not valid JSON")),
        "{e}"
    );
    let e = req_json(&t, Method::GET, "/v1/books/x", None, "").unwrap_err();
    assert!(
        matches!(&e, TranscodeError::BadRequest(m) if m.contains("\"id\"")),
        "{e}"
    );
    let e = req_json(
        &t,
        Method::GET,
        "/v1/books/1",
        Some("with_reviews=maybe"),
        "",
    )
    .unwrap_err();
    assert!(
        matches!(&e, TranscodeError::BadRequest(m) if m.contains("with_reviews")),
        "{e}"
    );
    let e = req_json(&t, Method::GET, "/v1/books/1", Some("nope=1"), "").unwrap_err();
    assert!(
        matches!(&e, TranscodeError::BadRequest(m) if m.contains("nope")),
        "{e}"
    );
    // Unknown names are ignored when the route allows them.
    let lax = transcoder(false);
    assert!(req_json(&lax, Method::GET, "/v1/books/1", Some("nope=1"), "").is_ok());
    assert!(req_json(&lax, Method::POST, "/v1/echo", None, r#"{"titel": "x"}"#).is_ok());
}

#[test]
fn unknown_routes_and_streaming_are_refused() {
    let t = transcoder(true);
    assert_eq!(
        t.find(&Method::GET, "/v1/nothing").unwrap_err().status(),
        (404, 5)
    );
    assert_eq!(
        t.find(&Method::DELETE, "/v1/books/1").unwrap_err().status(),
        (404, 5)
    );
    let (b, _) = t.find(&Method::POST, "/v1/collect").unwrap();
    assert!(b.method.is_client_streaming());
    let (b, _) = t.find(&Method::GET, "/v1/shelves/1/books").unwrap();
    assert!(b.method.is_server_streaming());
}

#[test]
fn replies_are_proto3_json() {
    let t = transcoder(true);
    let (b, vars) = t.find(&Method::POST, "/v1/echo").unwrap();
    let body = r#"{"id":"9007199254740993","genre":"FICTION","published":"2024-05-01T12:00:00Z","stock_by_store":{"a":"5"},"inPrint":true}"#;
    let bytes = t.request(b, vars, None, body.as_bytes()).unwrap();
    let out: Value = serde_json::from_slice(&t.response(b, &bytes).unwrap()).unwrap();
    assert_eq!(
        out,
        json!({"id": "9007199254740993", "genre": "FICTION", "published": "2024-05-01T12:00:00Z", "stockByStore": {"a": "5"}, "inPrint": true})
    );
    assert!(t.response(b, &[0xff, 0xff]).is_err());
}

#[test]
fn an_explicit_method_takes_any_path() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let pool =
        crate::translate::descriptors::compile(&[root.join("tests/protos/bookstore.proto")], &[])
            .unwrap();
    let opts = JsonOptions {
        emit_defaults: true,
        deny_unknown_fields: true,
        initial_metadata: MetadataHeaders::Prefixed,
        stream: StreamFormat::Ndjson,
    };
    let t = Transcoder::single(pool.clone(), "bookstore.v1.Bookstore/Ping", opts).unwrap();
    let (b, vars) = t.find(&Method::POST, "/anything").unwrap();
    assert_eq!(b.grpc_path, "/bookstore.v1.Bookstore/Ping");
    assert!(t.request(b, vars, None, br#"{"text":"hi"}"#).is_ok());
    assert!(Transcoder::single(pool.clone(), "bookstore.v1.Bookstore/Nope", opts).is_err());
    assert!(Transcoder::single(pool, "Ping", opts).is_err());
}

#[test]
fn client_streams_split_as_arrays_and_lines_in_any_pieces() {
    let want: Vec<&[u8]> = vec![br#"{"a":"x]}"}"#, br#"{"b":[1,{"c":"\\\""}]}"#, b"{}"];
    for body in [
        &br#" [ {"a":"x]}"} , {"b":[1,{"c":"\\\""}]},{} ] "#[..],
        &b"{\"a\":\"x]}\"}\n{\"b\":[1,{\"c\":\"\\\\\\\"\"}]}\n{}\n"[..],
    ] {
        // Every split of the body into two pieces gives the same messages.
        for cut in 0..=body.len() {
            let mut s = MessageSplitter::default();
            let mut out = Vec::new();
            s.push(&body[..cut], &mut out).unwrap();
            s.push(&body[cut..], &mut out).unwrap();
            s.finish().unwrap();
            let got: Vec<&[u8]> = out.iter().map(Vec::as_slice).collect();
            assert_eq!(got, want, "cut at {cut}");
        }
    }
    for bad in [&b"[1,2]"[..], b"\"x\"", b"[{}] {}"] {
        let mut s = MessageSplitter::default();
        assert!(s.push(bad, &mut Vec::new()).is_err(), "{bad:?}");
    }
    for open in [&b"[{}"[..], b"{\"a\":1"] {
        let mut s = MessageSplitter::default();
        s.push(open, &mut Vec::new()).unwrap();
        assert!(s.finish().is_err(), "{open:?}");
    }
}

#[test]
fn a_whole_body_message_is_read_as_the_long_way_reads_it() {
    for deny in [true, false] {
        let t = transcoder(deny);
        let (b, _) = t.find(&Method::POST, "/v1/echo").unwrap();
        for body in [
            r#"{"id":"9007199254740993","genre":"FICTION","published":"2024-05-01T12:00:00Z","stock_by_store":{"a":"5"},"inPrint":true}"#,
            " \n{\"title\":\"t\\u00e9\\\"x\",\"author\":{\"name\":\"n\",\"born\":1970},\"tags\":[\"a\",\"b\"],\"price\":1.5e2}\r\n",
            r#"{"id":1,"id":2,"tags":["a"],"tags":["b"],"price":null}"#,
            r#"{}"#,
        ] {
            let direct = t.message(b, Vec::new(), None, body.as_bytes()).unwrap();
            let long = t
                .message_via_value(b, Vec::new(), None, body.as_bytes())
                .unwrap();
            assert_eq!(direct.encode_to_vec(), long.encode_to_vec(), "{body}");
        }
        // What the direct read refuses gets the long way's error, word for word.
        for body in [
            r#"{"id": "x1"}"#,
            r#"{"author": {"born": "old"}}"#,
            r#"{"id": 1"#,
            r#"{"id": 1} x"#,
            r#"{"id": 1}{"id": 2}"#,
            "[1]",
            "\"x\"",
            "\u{c}{}",
        ] {
            let direct = t.message(b, Vec::new(), None, body.as_bytes()).unwrap_err();
            let long = t
                .message_via_value(b, Vec::new(), None, body.as_bytes())
                .unwrap_err();
            assert_eq!(direct, long, "{body}");
        }
        // The one difference, and the sign the direct read is taken: a field given by
        // both its names takes the later value (the long way's map sorts the keys).
        let body = br#"{"pageCount":"2","page_count":"1"}"#;
        let page = |m: DynamicMessage| m.get_field_by_name("page_count").unwrap().as_u64();
        let direct = t.message(b, Vec::new(), None, body).unwrap();
        assert_eq!(page(direct), Some(1));
        let body = br#"{"page_count":"1","pageCount":"2"}"#;
        let direct = t.message(b, Vec::new(), None, body).unwrap();
        assert_eq!(page(direct), Some(2));
    }
}

#[test]
fn a_request_frame_is_the_message_after_its_prefix() {
    let t = transcoder(true);
    for (method, path, query, body) in [
        (
            Method::POST,
            "/v1/echo",
            None,
            r#"{"title":"T","tags":["a","b"],"price":2.5}"#,
        ),
        (Method::POST, "/v1/echo", None, "{}"),
        (Method::POST, "/v1/echo", None, r#"{"price":1}"#),
        (
            Method::GET,
            "/v1/shelves/3/books/42",
            Some("with_reviews=true&tags=x"),
            "",
        ),
        // Longer than the room made for it (no body): the buffer grows.
        (
            Method::GET,
            "/v1/shelves/3/books/42",
            Some("tags=aaaaaaaaaaaa&tags=bbbbbbbbbbbb&tags=cccccccccccc"),
            "",
        ),
    ] {
        let (b, vars) = t.find(&method, path).unwrap();
        let message = t.request(b, vars.clone(), query, body.as_bytes()).unwrap();
        let frame = t.request_frame(b, vars, query, body.as_bytes()).unwrap();
        let len = u32::try_from(message.len()).unwrap().to_be_bytes();
        assert_eq!(frame[..5], [0, len[0], len[1], len[2], len[3]], "{body}");
        assert_eq!(frame[5..], message[..], "{body}");
    }
}
