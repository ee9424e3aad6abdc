//! The web console at `/console/` on the admin listener: its pages, embedded in the
//! binary, and the few reads its pages need that the admin API does not give.
//!
//! Owns: the embedded assets (`assets/`, vanilla JS modules, no build step) and the
//! headers they are served with (a strict `Content-Security-Policy` with no inline script
//! or style, `X-Frame-Options: DENY`, `X-Content-Type-Options: nosniff`); the console's
//! read endpoints `GET /console/api/{overview,services,admission,config}` ([`api`]),
//! which need the admin token.
//! Must not: change state. Every action in the console is a call the browser makes to
//! the admin API itself (`/v1/releases…`, `/v1/reload`), with the token the operator
//! typed, so nothing here bypasses the admin API's checks.

pub mod api;
pub mod redact;

use http::{Response, StatusCode};
use serde_json::Value;

/// The policy for every console answer: scripts, styles and calls only from this
/// listener, no inline code, never framed, nothing sent elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
frame-ancestors 'none'";

/// One embedded file: its path under `/console/`, content type and bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file of the console, in the binary.
const ASSETS: &[Asset] = &[
    Asset {
        path: "/console/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("assets/index.html"),
    },
    Asset {
        path: "/console/console.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("assets/console.css"),
    },
    Asset {
        path: "/console/app.js",
        content_type: JS,
        body: include_bytes!("assets/app.js"),
    },
    Asset {
        path: "/console/api.js",
        content_type: JS,
        body: include_bytes!("assets/api.js"),
    },
    Asset {
        path: "/console/overview.js",
        content_type: JS,
        body: include_bytes!("assets/overview.js"),
    },
    Asset {
        path: "/console/services.js",
        content_type: JS,
        body: include_bytes!("assets/services.js"),
    },
    Asset {
        path: "/console/admission.js",
        content_type: JS,
        body: include_bytes!("assets/admission.js"),
    },
    Asset {
        path: "/console/releases.js",
        content_type: JS,
        body: include_bytes!("assets/releases.js"),
    },
    Asset {
        path: "/console/config.js",
        content_type: JS,
        body: include_bytes!("assets/config.js"),
    },
];

/// Paths this module answers (any method; only GET is served).
pub fn handles(path: &str) -> bool {
    path == "/console" || path.starts_with("/console/")
}

/// The console's data reads, which need the admin token like the admin API's calls.
pub fn needs_token(path: &str) -> bool {
    path.starts_with(api::PREFIX)
}

/// Adds the console's security headers to an answer.
fn secured(mut resp: Response<Vec<u8>>) -> Response<Vec<u8>> {
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(CSP),
    );
    h.insert(
        http::header::X_FRAME_OPTIONS,
        http::HeaderValue::from_static("DENY"),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        http::header::REFERRER_POLICY,
        http::HeaderValue::from_static("no-referrer"),
    );
    resp
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Vec<u8>> {
    crate::base::api::error(status, code, message)
}

/// A refusal (the admin API's token check, a wrong method) with the console's headers.
pub fn refuse(resp: Response<Vec<u8>>) -> Response<Vec<u8>> {
    secured(resp)
}

/// Answers a request under [`handles`]; a path under [`needs_token`] is already
/// authorised by the caller.
pub fn serve(ctx: &api::Context<'_>, method: &http::Method, path: &str) -> Response<Vec<u8>> {
    if method != http::Method::GET {
        return secured(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "the console's pages are read with GET; its actions call the admin API",
        ));
    }
    if path == "/console" {
        // Relative module paths in the page resolve against `/console/`.
        let mut resp = crate::base::api::reply(
            StatusCode::PERMANENT_REDIRECT,
            "text/plain; charset=utf-8",
            b"see /console/\n".to_vec(),
        );
        resp.headers_mut().insert(
            http::header::LOCATION,
            http::HeaderValue::from_static("/console/"),
        );
        return secured(resp);
    }
    if let Some(what) = path.strip_prefix(api::PREFIX) {
        let answer: Option<Value> = api::read(ctx, what);
        return secured(match answer {
            Some(v) => crate::base::api::json_reply(StatusCode::OK, v),
            None => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "the console reads overview, services, admission and config",
            ),
        });
    }
    match ASSETS.iter().find(|a| a.path == path) {
        Some(a) => secured(crate::base::api::reply(
            StatusCode::OK,
            a.content_type,
            a.body.to_vec(),
        )),
        None => secured(error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such console page",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_names_is_embedded() {
        let index = std::str::from_utf8(ASSETS[0].body).unwrap();
        for a in ASSETS {
            let js = std::str::from_utf8(a.body).unwrap();
            // Modules import each other as "./name.js"; each must be served.
            for name in js
                .split(['"', '\''])
                .filter(|s| s.starts_with("./") && (s.ends_with(".js") || s.ends_with(".css")))
            {
                let p = format!("/console/{}", &name[2..]);
                assert!(ASSETS.iter().any(|b| b.path == p), "{} names {p}", a.path);
            }
        }
        assert!(index.contains("app.js") && index.contains("console.css"));
    }

    #[test]
    fn no_inline_script_or_style() {
        let index = std::str::from_utf8(ASSETS[0].body).unwrap();
        assert!(!index.contains("<script>"), "inline script");
        assert!(!index.contains("<style"), "inline style");
        assert!(!index.contains("style=\""), "inline style attribute");
        assert!(!index.contains("onclick"), "inline handler");
    }
}
