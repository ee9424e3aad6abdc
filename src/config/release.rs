//! A route's `[route.split]` section: gray release between versions of its service.
//!
//! Owns: the split's one serde shape (the TOML section, the admin API's JSON body, the
//! override file and etcd values all use it, so they are validated by one function),
//! the validated [`SplitConfig`], and the per-endpoint `version` check.
//! Must not: pick versions or hold counters (that is `release`).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use http::{HeaderName, HeaderValue};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::model::ServiceConfig;
use super::validate::Validator;

/// Longest version name: versions become metric labels, so keep them short.
pub const MAX_VERSION_LEN: usize = 64;
/// Rules one split may have; they are tried in order on every request.
pub const MAX_RULES: usize = 64;
/// Users and CIDRs one rule may list (an admin body is bounded by this, too).
pub const MAX_RULE_ITEMS: usize = 10_000;
/// Users are hashed into this many buckets; weights and `user_hash` ranges are in them (percent).
pub const USER_BUCKETS: u8 = 100;

/// Splits by route name (routes without `[route.split]` are absent).
pub type Splits = HashMap<String, SplitConfig>;

/// The split as written: TOML `[route.split]`, or JSON for the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    stable: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    weights: BTreeMap<String, i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    header: Option<NameValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cookie: Option<NameValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    users: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user_hash: Option<HashRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_cidr: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NameValue {
    name: String,
    value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HashRange {
    from: i64,
    to: i64,
}

/// How a route's traffic is split between versions of its service.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitConfig {
    /// Takes whatever no rule and no weight claims, and every fallback.
    pub stable: String,
    /// Tried in order; the first that matches decides.
    pub rules: Vec<SplitRule>,
    /// Versions other than `stable` with their percent of users, in name order; each
    /// takes the next slice of the user buckets, so widening a canary keeps its users.
    pub weights: Vec<(String, u8)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SplitRule {
    pub version: String,
    pub when: RuleMatch,
}

/// What a rule looks at.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleMatch {
    /// The request header has exactly this value.
    Header(HeaderName, String),
    /// The cookie has exactly this value.
    Cookie(String, String),
    /// The authenticated user (admission identity) is one of these.
    Users(Vec<String>),
    /// The user's bucket (0-99; user identity, else client address) is in `from..to`.
    UserHash { from: u8, to: u8 },
    /// The client address is in one of these.
    ClientCidr(Vec<IpNet>),
}

impl SplitConfig {
    /// Everything to `stable`: what a rollback applies.
    pub fn all_stable(stable: &str) -> SplitConfig {
        SplitConfig {
            stable: stable.to_string(),
            rules: Vec::new(),
            weights: Vec::new(),
        }
    }

    /// The JSON form (the admin API's body shape).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.spec()).unwrap_or_default()
    }

    fn spec(&self) -> SplitSpec {
        let mut weights: BTreeMap<String, i64> = self
            .weights
            .iter()
            .map(|(v, w)| (v.clone(), i64::from(*w)))
            .collect();
        if !weights.is_empty() {
            let rest = 100 - weights.values().sum::<i64>();
            weights.insert(self.stable.clone(), rest);
        }
        let rules = self
            .rules
            .iter()
            .map(|r| {
                let mut s = RuleSpec {
                    version: r.version.clone(),
                    header: None,
                    cookie: None,
                    users: None,
                    user_hash: None,
                    client_cidr: None,
                };
                match &r.when {
                    RuleMatch::Header(n, v) => {
                        s.header = Some(NameValue {
                            name: n.as_str().to_string(),
                            value: v.clone(),
                        })
                    }
                    RuleMatch::Cookie(n, v) => {
                        s.cookie = Some(NameValue {
                            name: n.clone(),
                            value: v.clone(),
                        })
                    }
                    RuleMatch::Users(u) => s.users = Some(u.clone()),
                    RuleMatch::UserHash { from, to } => {
                        s.user_hash = Some(HashRange {
                            from: i64::from(*from),
                            to: i64::from(*to),
                        })
                    }
                    RuleMatch::ClientCidr(c) => {
                        s.client_cidr = Some(c.iter().map(|n| n.to_string()).collect())
                    }
                }
                s
            })
            .collect();
        SplitSpec {
            stable: self.stable.clone(),
            weights,
            rules,
        }
    }

    /// Every version the split names, stable first, each once.
    pub fn versions(&self) -> Vec<&str> {
        let mut out = vec![self.stable.as_str()];
        let named = self
            .rules
            .iter()
            .map(|r| r.version.as_str())
            .chain(self.weights.iter().map(|(v, _)| v.as_str()));
        for v in named {
            if !out.contains(&v) {
                out.push(v);
            }
        }
        out
    }

    /// A service that takes no registrations has all its versions in the file: its
    /// stable version must be one of them, or the split would send nothing where meant.
    pub fn check_service(&self, svc: &ServiceConfig) -> Result<(), String> {
        if svc.registration
            || svc
                .endpoints
                .iter()
                .any(|e| e.version.as_deref() == Some(self.stable.as_str()))
        {
            return Ok(());
        }
        Err(format!(
            "stable version \"{}\" is on none of service \"{}\"'s endpoints (set `version` on them)",
            self.stable, svc.name
        ))
    }
}

/// A version name: 1-64 of a-z, A-Z, 0-9, '.', '-', '_', '+'.
pub fn check_version(v: &str) -> Result<(), String> {
    if v.is_empty()
        || v.len() > MAX_VERSION_LEN
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'+'))
    {
        return Err(format!(
            "\"{}\" is not a version: 1-{MAX_VERSION_LEN} characters of letters, digits, '.', '-', '_', '+'",
            v.chars().take(MAX_VERSION_LEN + 8).collect::<String>()
        ));
    }
    Ok(())
}

fn cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

impl SplitSpec {
    /// Validates; every problem is returned, each prefixed by the field it concerns.
    pub fn compile(&self) -> Result<SplitConfig, Vec<String>> {
        let mut errors = Vec::new();
        if let Err(e) = check_version(&self.stable) {
            errors.push(format!("stable: {e}"));
        }
        let mut weights = Vec::new();
        let mut total: i64 = 0;
        let mut stable_weight = None;
        for (v, &w) in &self.weights {
            if let Err(e) = check_version(v) {
                errors.push(format!("weights: {e}"));
                continue;
            }
            if !(0..=100).contains(&w) {
                errors.push(format!(
                    "weights.{v}: a weight is a percent, 0-100, got {w}"
                ));
                continue;
            }
            total += w;
            if *v == self.stable {
                stable_weight = Some(w);
            } else if w > 0 {
                weights.push((v.clone(), w as u8));
            }
        }
        if total > 100 {
            errors.push(format!("weights: they add up to {total}%, more than 100"));
        } else if stable_weight.is_some() && total != 100 {
            errors.push(format!(
                "weights: with the stable version listed they must add up to 100, got {total}"
            ));
        }
        if self.rules.len() > MAX_RULES {
            errors.push(format!("rules: at most {MAX_RULES}"));
        }
        let mut rules = Vec::with_capacity(self.rules.len());
        for (i, r) in self.rules.iter().enumerate().take(MAX_RULES) {
            match r.compile() {
                Ok(rule) => rules.push(rule),
                Err(e) => errors.push(format!("rules[{i}].{e}")),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(SplitConfig {
            stable: self.stable.clone(),
            rules,
            weights,
        })
    }
}

impl RuleSpec {
    fn compile(&self) -> Result<SplitRule, String> {
        check_version(&self.version).map_err(|e| format!("version: {e}"))?;
        let set = [
            self.header.is_some(),
            self.cookie.is_some(),
            self.users.is_some(),
            self.user_hash.is_some(),
            self.client_cidr.is_some(),
        ]
        .iter()
        .filter(|&&b| b)
        .count();
        if set != 1 {
            return Err(
                "when: a rule has exactly one of header, cookie, users, user_hash, client_cidr"
                    .into(),
            );
        }
        let too_many = |field: &str, n: usize| {
            (n > MAX_RULE_ITEMS).then(|| format!("{field}: at most {MAX_RULE_ITEMS} entries"))
        };
        let when = if let Some(h) = &self.header {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("header.name: \"{}\" is not a header name", h.name))?;
            HeaderValue::from_str(&h.value)
                .map_err(|_| "header.value: not a valid header value".to_string())?;
            RuleMatch::Header(name, h.value.clone())
        } else if let Some(c) = &self.cookie {
            let token = |s: &str| {
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'=' | b'"'))
            };
            if !token(&c.name) {
                return Err(format!("cookie.name: \"{}\" is not a cookie name", c.name));
            }
            if !c.value.bytes().all(|b| b.is_ascii_graphic() && b != b';') {
                return Err("cookie.value: not a valid cookie value".into());
            }
            RuleMatch::Cookie(c.name.clone(), c.value.clone())
        } else if let Some(users) = &self.users {
            if let Some(e) = too_many("users", users.len()) {
                return Err(e);
            }
            if users.is_empty() || users.iter().any(|u| u.is_empty() || u.len() > 256) {
                return Err("users: a non-empty list of user ids (1-256 bytes each)".into());
            }
            let mut users = users.clone();
            users.sort();
            users.dedup();
            RuleMatch::Users(users)
        } else if let Some(r) = &self.user_hash {
            let max = i64::from(USER_BUCKETS);
            if !(0..max).contains(&r.from) || !(1..=max).contains(&r.to) || r.from >= r.to {
                return Err(format!(
                    "user_hash: from..to is a range of user buckets within 0..{max} with from < to, got {}..{}",
                    r.from, r.to
                ));
            }
            RuleMatch::UserHash {
                from: r.from as u8,
                to: r.to as u8,
            }
        } else {
            let list = self.client_cidr.as_deref().unwrap_or_default();
            if let Some(e) = too_many("client_cidr", list.len()) {
                return Err(e);
            }
            if list.is_empty() {
                return Err("client_cidr: a non-empty list of CIDRs".into());
            }
            let mut nets = Vec::with_capacity(list.len());
            for c in list {
                nets.push(cidr(c).ok_or_else(|| {
                    format!("client_cidr: \"{c}\" is not a CIDR like \"10.0.0.0/8\" or an address")
                })?);
            }
            RuleMatch::ClientCidr(nets)
        };
        Ok(SplitRule {
            version: self.version.clone(),
            when,
        })
    }
}

/// Parses and validates a split in its JSON form (admin API body, override file, etcd).
pub fn parse_split_json(body: &[u8]) -> Result<SplitConfig, String> {
    let spec: SplitSpec = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    spec.compile().map_err(|e| e.join("; "))
}

impl Validator<'_> {
    /// `[route.split]`; problems are reported at the section with the field they concern.
    pub(super) fn route_split(
        &mut self,
        f: Option<&Spanned<SplitSpec>>,
        svc: Option<&ServiceConfig>,
        ctx: &str,
    ) -> Option<SplitConfig> {
        let f = f?;
        match f.get_ref().compile() {
            Ok(split) => {
                if let Some(Err(e)) = svc.map(|s| split.check_service(s)) {
                    self.err(f.span(), ctx, format!("split: {e}"));
                    return None;
                }
                Some(split)
            }
            Err(errors) => {
                for e in errors {
                    self.err(f.span(), ctx, format!("split.{e}"));
                }
                None
            }
        }
    }

    /// An endpoint's `version`.
    pub(super) fn endpoint_version(
        &mut self,
        v: &Option<Spanned<String>>,
        ctx: &str,
    ) -> Option<String> {
        let v = v.as_ref()?;
        if let Err(e) = check_version(v.get_ref()) {
            self.err(v.span(), ctx, e);
            return None;
        }
        Some(v.get_ref().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<SplitConfig, String> {
        parse_split_json(json.as_bytes())
    }

    #[test]
    fn weights_exclude_stable_and_round_trip() {
        let s = parse(r#"{"stable":"v1","weights":{"v1":90,"v2":10}}"#).unwrap();
        assert_eq!(s.weights, vec![("v2".to_string(), 10)]);
        let back = parse(&s.to_json().to_string()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn rules_compile_and_round_trip() {
        let s = parse(
            r#"{"stable":"v1","rules":[
                {"version":"v2","header":{"name":"X-Canary","value":"1"}},
                {"version":"v2","cookie":{"name":"canary","value":"yes"}},
                {"version":"v3","users":["bob","alice","bob"]},
                {"version":"v2","user_hash":{"from":0,"to":10}},
                {"version":"v2","client_cidr":["10.0.0.0/8","192.168.1.7"]}]}"#,
        )
        .unwrap();
        assert_eq!(s.rules.len(), 5);
        assert_eq!(
            s.rules[2].when,
            RuleMatch::Users(vec!["alice".into(), "bob".into()])
        );
        assert_eq!(s.versions(), vec!["v1", "v2", "v3"]);
        assert_eq!(parse(&s.to_json().to_string()).unwrap(), s);
    }

    const TOML: &str = r#"
[listen]
http = ["127.0.0.1:8080"]

[[service]]
name = "orders"
endpoints = [{ addr = "127.0.0.1:9001", version = "v1" }, { addr = "127.0.0.1:9002", version = "v2" }]

[[route]]
name = "orders"
service = "orders"
[route.split]
stable = "v1"
weights = { v2 = 10 }
[[route.split.rules]]
version = "v2"
header = { name = "x-canary", value = "1" }
"#;

    #[test]
    fn the_toml_section_validates() {
        let c = crate::config::parse(std::path::Path::new("t.toml"), TOML).unwrap();
        let s = &c.splits["orders"];
        assert_eq!(s.weights, vec![("v2".to_string(), 10)]);
        assert_eq!(c.services[0].endpoints[1].version.as_deref(), Some("v2"));
    }

    #[test]
    fn toml_errors_name_the_route_and_place() {
        let errors = |src: &str| match crate::config::parse(std::path::Path::new("t.toml"), src) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        };
        let e = errors(&TOML.replace("stable = \"v1\"", "stable = \"v9\""));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("t.toml:12:1: route \"orders\": split: stable version \"v9\""),
            "{e:?}"
        );
        let e = errors(&TOML.replace("v2 = 10", "v2 = 101"));
        assert!(e[0].contains("split.weights.v2"), "{e:?}");
        let e = errors(&TOML.replace("header = {", "heder = {"));
        assert!(
            e[0].starts_with("t.toml:17:1") && e[0].contains("heder"),
            "{e:?}"
        );
        let e = errors(&TOML.replace("version = \"v2\" }", "version = \"v 2\" }"));
        assert!(
            e[0].contains("service \"orders\"") && e[0].contains("not a version"),
            "{e:?}"
        );
    }

    #[test]
    fn bad_splits_say_which_field() {
        let e = parse(r#"{"stable":"v1","weights":{"v2":80,"v3":30}}"#).unwrap_err();
        assert!(e.contains("add up to 110"), "{e}");
        let e = parse(r#"{"stable":"v1","weights":{"v1":50,"v2":10}}"#).unwrap_err();
        assert!(e.contains("must add up to 100"), "{e}");
        let e = parse(r#"{"stable":"v 1"}"#).unwrap_err();
        assert!(e.starts_with("stable: "), "{e}");
        let e = parse(r#"{"stable":"v1","rules":[{"version":"v2"}]}"#).unwrap_err();
        assert!(e.contains("rules[0].when"), "{e}");
        let e =
            parse(r#"{"stable":"v1","rules":[{"version":"v2","user_hash":{"from":5,"to":5}}]}"#)
                .unwrap_err();
        assert!(e.contains("rules[0].user_hash"), "{e}");
        let e =
            parse(r#"{"stable":"v1","rules":[{"version":"v2","client_cidr":["x"]}]}"#).unwrap_err();
        assert!(e.contains("client_cidr"), "{e}");
        let e = parse(r#"{"stable":"v1","weight":{}}"#).unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
    }
}
