//! Configuration, the HTTP layer (auth, retries with backoff, error mapping) and shared helpers.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::{HubError, Result};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Kind of Hub repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum RepoType {
    /// `models`: URLs `{endpoint}/{repo}`, cache `models--owner--name`.
    #[default]
    Model,
    /// `datasets`: URLs `{endpoint}/datasets/{repo}`, cache `datasets--owner--name`.
    Dataset,
    /// `spaces`: URLs `{endpoint}/spaces/{repo}` (push only; vsft never pulls spaces).
    Space,
}

impl RepoType {
    /// `"model"`, `"dataset"`, `"space"`.
    pub fn as_str(self) -> &'static str {
        match self {
            RepoType::Model => "model",
            RepoType::Dataset => "dataset",
            RepoType::Space => "space",
        }
    }
    /// Segment of the REST API: `/api/{models|datasets|spaces}/…`; also the cache folder prefix.
    pub(crate) fn plural(self) -> &'static str {
        match self {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
            RepoType::Space => "spaces",
        }
    }
    /// Prefix of git-side URLs (resolve, LFS): `""`, `"datasets/"`, `"spaces/"`.
    pub(crate) fn url_prefix(self) -> &'static str {
        match self {
            RepoType::Model => "",
            RepoType::Dataset => "datasets/",
            RepoType::Space => "spaces/",
        }
    }
}

/// Everything the client needs; [`HubConfig::from_env`] reads it from the environment as
/// `huggingface_hub` does. Tests build it explicitly (no process-global state).
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Base URL without trailing `/` (`HF_ENDPOINT`).
    pub endpoint: String,
    /// Access token (`HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, `$HF_TOKEN_PATH`, `$HF_HOME/token`).
    pub token: Option<String>,
    /// The hub cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`), holding `models--owner--name/…`.
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE=1`: never touch the network, resolve from the cache only.
    pub offline: bool,
    /// Attempts per request on 5xx/429 and connection errors (at least 1).
    pub max_tries: u32,
    /// First backoff delay; doubled after each failed attempt (capped at 8 s).
    pub retry_base_delay: Duration,
    /// Draw progress bars (they are hidden anyway when stderr is not a terminal;
    /// `HF_HUB_DISABLE_PROGRESS_BARS=1` turns them off).
    pub progress: bool,
}

impl Default for HubConfig {
    /// The public Hub, no token, `~/.cache/huggingface/hub`, online. Reads no variable but `HOME`.
    fn default() -> Self {
        HubConfig {
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token: None,
            cache_dir: home_dir().join(".cache/huggingface/hub"),
            offline: false,
            max_tries: 5,
            retry_base_delay: Duration::from_millis(500),
            progress: true,
        }
    }
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}

fn expand_tilde(p: &str) -> PathBuf {
    if p == "~" {
        home_dir()
    } else if let Some(rest) = p.strip_prefix("~/") {
        home_dir().join(rest)
    } else {
        PathBuf::from(p)
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

fn env_true(name: &str) -> bool {
    env_nonempty(name).is_some_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
}

impl HubConfig {
    /// Reads the environment like `huggingface_hub`:
    /// - endpoint: `HF_ENDPOINT` (default `https://huggingface.co`, trailing `/` stripped);
    /// - token: `HF_TOKEN` → `HUGGING_FACE_HUB_TOKEN` → file `$HF_TOKEN_PATH` or `$HF_HOME/token`;
    /// - `HF_HOME` (default `$XDG_CACHE_HOME/huggingface` or `~/.cache/huggingface`);
    /// - cache: `HF_HUB_CACHE` → `HUGGINGFACE_HUB_CACHE` → `$HF_HOME/hub`;
    /// - `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`), `HF_HUB_DISABLE_PROGRESS_BARS`.
    pub fn from_env() -> Self {
        Self::from_lookup(env_nonempty, env_true)
    }

    fn from_lookup(get: impl Fn(&str) -> Option<String>, is_true: impl Fn(&str) -> bool) -> Self {
        let hf_home = get("HF_HOME").map(|h| expand_tilde(&h)).unwrap_or_else(|| {
            get("XDG_CACHE_HOME")
                .map(|x| expand_tilde(&x))
                .unwrap_or_else(|| home_dir().join(".cache"))
                .join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(|c| expand_tilde(&c))
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = get("HF_TOKEN").or_else(|| get("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            let path = get("HF_TOKEN_PATH").map(|p| expand_tilde(&p)).unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        let endpoint = get("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        HubConfig {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            cache_dir,
            offline: is_true("HF_HUB_OFFLINE") || is_true("TRANSFORMERS_OFFLINE"),
            progress: !is_true("HF_HUB_DISABLE_PROGRESS_BARS"),
            ..HubConfig::default()
        }
    }
}

/// A blocking Hub client. Cheap to clone.
#[derive(Clone)]
pub struct HubClient {
    pub(crate) cfg: HubConfig,
    /// Follows up to 5 redirects, dropping `authorization` on them.
    pub(crate) agent: ureq::Agent,
    /// Does not follow redirects (HEAD of `resolve` reads the metadata of the 302 itself).
    pub(crate) agent_noredirect: ureq::Agent,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("endpoint", &self.cfg.endpoint)
            .field("token", &self.cfg.token.as_ref().map(|_| "<set>"))
            .field("cache_dir", &self.cfg.cache_dir)
            .field("offline", &self.cfg.offline)
            .finish()
    }
}

/// What a request is about, for error messages.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ctx {
    pub what: String,
    pub repo: Option<(RepoType, String)>,
    pub revision: Option<String>,
    pub path: Option<String>,
    /// A presigned storage URL (S3/CDN), not the Hub: 401/403 there mean an expired or bad
    /// signature, not a token problem.
    pub external: bool,
}

impl Ctx {
    pub fn new(what: impl Into<String>) -> Self {
        Ctx { what: what.into(), ..Ctx::default() }
    }
    pub fn repo(mut self, t: RepoType, id: &str) -> Self {
        self.repo = Some((t, id.to_string()));
        self
    }
    pub fn rev(mut self, r: &str) -> Self {
        self.revision = Some(r.to_string());
        self
    }
    pub fn path(mut self, p: &str) -> Self {
        self.path = Some(p.to_string());
        self
    }
    pub fn external(mut self, yes: bool) -> Self {
        self.external = yes;
        self
    }
}

/// Request body; files are re-opened on every attempt so retries can resend them.
pub(crate) enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// `len` bytes of `path` from `offset`, with the progress bar advanced as they are sent.
    File {
        path: &'a Path,
        offset: u64,
        len: u64,
        bar: Option<&'a ProgressBar>,
    },
}

pub(crate) struct Req<'a> {
    pub method: &'a str,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub auth: bool,
    pub body: Body<'a>,
    pub follow_redirects: bool,
}

impl<'a> Req<'a> {
    pub fn new(method: &'a str, url: impl Into<String>) -> Self {
        Req { method, url: url.into(), headers: Vec::new(), auth: true, body: Body::Empty, follow_redirects: true }
    }
    pub fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    pub fn no_auth(mut self) -> Self {
        self.auth = false;
        self
    }
    pub fn body(mut self, b: Body<'a>) -> Self {
        self.body = b;
        self
    }
    pub fn json(self, v: &'a [u8]) -> Self {
        self.header("content-type", "application/json").body(Body::Bytes(v))
    }
    pub fn no_redirects(mut self) -> Self {
        self.follow_redirects = false;
        self
    }
}

/// A reader that advances a progress bar.
struct ProgressRead<'a, R> {
    inner: R,
    bar: Option<&'a ProgressBar>,
}

impl<R: Read> Read for ProgressRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(b) = self.bar {
            b.inc(n as u64);
        }
        Ok(n)
    }
}

const UA: &str = concat!("vsft-hub/", env!("CARGO_PKG_VERSION"), "; rust");

impl HubClient {
    /// A client with an explicit configuration.
    pub fn new(mut cfg: HubConfig) -> Self {
        cfg.endpoint = cfg.endpoint.trim_end_matches('/').to_string();
        cfg.max_tries = cfg.max_tries.max(1);
        // HTTPS_PROXY/ALL_PROXY/HTTP_PROXY are honoured, except for a loopback endpoint (ureq 2
        // knows no NO_PROXY).
        let host = origin(&cfg.endpoint).split("://").nth(1).unwrap_or("").to_string();
        let loopback = host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]");
        let build = |redirects| {
            ureq::AgentBuilder::new()
                .user_agent(UA)
                .redirects(redirects)
                .try_proxy_from_env(!loopback)
                .timeout_connect(Duration::from_secs(20))
                .timeout_read(Duration::from_secs(120))
                .timeout_write(Duration::from_secs(300))
                .build()
        };
        HubClient { agent: build(5), agent_noredirect: build(0), cfg }
    }

    /// A client configured from the environment ([`HubConfig::from_env`]).
    pub fn from_env() -> Self {
        Self::new(HubConfig::from_env())
    }

    /// The configuration in use.
    pub fn config(&self) -> &HubConfig {
        &self.cfg
    }

    pub(crate) fn api_url(&self, rest: &str) -> String {
        format!("{}{}", self.cfg.endpoint, rest)
    }

    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let d = self.cfg.retry_base_delay.saturating_mul(1u32 << attempt.min(10));
        d.min(Duration::from_secs(8))
    }

    /// Sends `req`, retrying 5xx/429 answers and connection errors with exponential backoff.
    /// Returns the response for 2xx (and 3xx when not following redirects); maps other
    /// statuses to a [`HubError`] described by `ctx`.
    pub(crate) fn send(&self, req: &Req<'_>, ctx: &Ctx) -> Result<ureq::Response> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let agent = if req.follow_redirects { &self.agent } else { &self.agent_noredirect };
            let mut r = agent.request(req.method, &req.url);
            for (k, v) in &req.headers {
                r = r.set(k, v);
            }
            if req.auth {
                if let Some(t) = &self.cfg.token {
                    r = r.set("authorization", &format!("Bearer {t}"));
                }
            }
            let res = match &req.body {
                Body::Empty => r.call(),
                Body::Bytes(b) => r.send_bytes(b),
                Body::File { path, offset, len, bar } => {
                    let mut f = std::fs::File::open(path).map_err(|e| HubError::io(*path, e))?;
                    use std::io::Seek;
                    f.seek(std::io::SeekFrom::Start(*offset)).map_err(|e| HubError::io(*path, e))?;
                    let start = bar.map(|b| b.position());
                    let res =
                        r.set("content-length", &len.to_string()).send(ProgressRead { inner: f.take(*len), bar: *bar });
                    if res.is_err() {
                        if let (Some(b), Some(s)) = (bar, start) {
                            b.set_position(s);
                        }
                    }
                    res
                }
            };
            match res {
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Status(code, resp)) => {
                    if (code >= 500 || code == 429) && attempt < self.cfg.max_tries {
                        // Rate limited: wait what the Hub asks (at most a minute), else back off.
                        let asked = resp
                            .header("retry-after")
                            .and_then(|v| v.trim().parse::<u64>().ok())
                            .map(|s| Duration::from_secs(s.min(60)));
                        std::thread::sleep(asked.unwrap_or_else(|| self.backoff(attempt - 1)));
                        continue;
                    }
                    return Err(self.status_error(code, resp, ctx));
                }
                Err(ureq::Error::Transport(t)) => {
                    if attempt < self.cfg.max_tries {
                        std::thread::sleep(self.backoff(attempt - 1));
                        continue;
                    }
                    return Err(HubError::Transport {
                        what: ctx.what.clone(),
                        endpoint: origin(&req.url).to_string(),
                        error: Box::new(t),
                    });
                }
            }
        }
    }

    /// Sends and parses a JSON answer.
    pub(crate) fn send_json<T: serde::de::DeserializeOwned>(&self, req: &Req<'_>, ctx: &Ctx) -> Result<T> {
        let resp = self.send(req, ctx)?;
        let mut body = String::new();
        resp.into_reader()
            .take(256 << 20)
            .read_to_string(&mut body)
            .map_err(|e| HubError::Protocol { what: ctx.what.clone(), msg: format!("reading the answer: {e}") })?;
        serde_json::from_str(&body).map_err(|e| HubError::Protocol {
            what: ctx.what.clone(),
            msg: format!("bad JSON ({e}): {}", truncate(&body, 300)),
        })
    }

    pub(crate) fn status_error(&self, code: u16, resp: ureq::Response, ctx: &Ctx) -> HubError {
        let err_code = resp.header("x-error-code").unwrap_or("").to_string();
        let err_msg = resp.header("x-error-message").unwrap_or("").to_string();
        let mut body = String::new();
        let _ = resp.into_reader().take(4096).read_to_string(&mut body);
        let server_msg = if !err_msg.is_empty() {
            err_msg
        } else {
            serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| truncate(body.trim(), 300).to_string())
        };
        let detail = if server_msg.is_empty() { String::new() } else { format!(" (server: {server_msg})") };
        let (rt, rid) = ctx.repo.clone().unwrap_or((RepoType::Model, String::new()));
        let rev = ctx.revision.clone().unwrap_or_else(|| "main".into());
        let repo_nf = |extra: &str| HubError::RepoNotFound {
            repo_type: rt.as_str(),
            repo_id: rid.clone(),
            endpoint: self.cfg.endpoint.clone(),
            detail: format!("{extra}{detail}"),
        };
        if ctx.external {
            return HubError::Http {
                what: ctx.what.clone(),
                status: code,
                body: format!("{server_msg}; the presigned URL was refused or expired, retry the command"),
            };
        }
        match (code, err_code.as_str()) {
            (401 | 403 | 404, "RepoNotFound") if ctx.repo.is_some() => {
                repo_nf(if code == 404 { "" } else { " (HTTP 401: set HF_TOKEN if it is private)" })
            }
            (404, "RevisionNotFound") if ctx.repo.is_some() => {
                HubError::RevisionNotFound { repo_type: rt.as_str(), repo_id: rid, revision: rev, detail }
            }
            (404, "EntryNotFound") => HubError::EntryNotFound {
                repo_id: rid,
                revision: rev,
                path: ctx.path.clone().unwrap_or_default(),
                detail,
            },
            (401 | 403, _) => HubError::Auth {
                what: ctx.what.clone(),
                status: code,
                detail,
                token_hint: if self.cfg.token.is_none() { " (no token is configured)" } else { "" },
            },
            (404, _) if ctx.path.is_some() && ctx.repo.is_some() => HubError::EntryNotFound {
                repo_id: rid,
                revision: rev,
                path: ctx.path.clone().unwrap_or_default(),
                detail,
            },
            (404, _) if ctx.repo.is_some() => repo_nf(&format!(", or its revision {rev:?} does not exist")),
            _ => HubError::Http { what: ctx.what.clone(), status: code, body: server_msg },
        }
    }

    /// A byte progress bar on stderr (hidden when stderr is not a terminal or bars are off).
    pub(crate) fn bar(&self, len: u64, msg: impl Into<String>) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        if !self.cfg.progress {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template("{msg:30!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(msg.into());
        bar
    }
}

/// `scheme://host[:port]` of a URL.
pub(crate) fn origin(url: &str) -> &str {
    let after = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after..].find('/') {
        Some(i) => &url[..after + i],
        None => url,
    }
}

pub(crate) fn truncate(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = n;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

/// Percent-encodes everything but unreserved characters (and `/` when `keep_slash`).
pub(crate) fn quote(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Checks an `owner/name` (or `name`) repo id as the Hub does.
pub(crate) fn validate_repo_id(id: &str) -> Result<()> {
    let bad = |why: &str| Err(HubError::Invalid(format!("invalid Hub repo id {id:?}: {why} (expected owner/name)")));
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
        return bad("needs one `/` between two non-empty parts");
    }
    for p in &parts {
        if !p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return bad("only letters, digits, '-', '_' and '.' are allowed");
        }
        if p.starts_with(['-', '.']) || p.ends_with(['-', '.']) {
            return bad("parts can't start or end with '-' or '.'");
        }
    }
    if id.contains("--") || id.contains("..") {
        return bad("'--' and '..' are forbidden");
    }
    if id.len() > 96 {
        return bad("longer than 96 characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let tokfile = dir.path().join("tok");
        std::fs::write(&tokfile, "hf_file\n").unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(home.join("token"), "hf_home\n").unwrap();
        let run = |vars: &[(&str, String)]| {
            let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            HubConfig::from_lookup(
                |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
                |k| vars.iter().any(|(n, v)| n == k && v == "1"),
            )
        };
        let h = home.display().to_string();
        let c = run(&[("HF_HOME", h.clone()), ("HF_ENDPOINT", "http://x:1/".into())]);
        assert_eq!(c.endpoint, "http://x:1");
        assert_eq!(c.token.as_deref(), Some("hf_home"));
        assert_eq!(c.cache_dir, home.join("hub"));
        assert!(!c.offline);
        let c = run(&[("HF_HOME", h.clone()), ("HF_TOKEN_PATH", tokfile.display().to_string())]);
        assert_eq!(c.token.as_deref(), Some("hf_file"));
        let c = run(&[("HF_HOME", h.clone()), ("HUGGING_FACE_HUB_TOKEN", "hf_old".into())]);
        assert_eq!(c.token.as_deref(), Some("hf_old"));
        let c = run(&[
            ("HF_HOME", h.clone()),
            ("HUGGING_FACE_HUB_TOKEN", "hf_old".into()),
            ("HF_TOKEN", "hf_new".into()),
            ("HF_HUB_CACHE", "/c".into()),
            ("HF_HUB_OFFLINE", "1".into()),
        ]);
        assert_eq!(c.token.as_deref(), Some("hf_new"));
        assert_eq!(c.cache_dir, PathBuf::from("/c"));
        assert!(c.offline);
        assert_eq!(c.endpoint, DEFAULT_ENDPOINT);
    }

    #[test]
    fn quoting_and_ids() {
        assert_eq!(quote("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(quote("a b/c.json", true), "a%20b/c.json");
        assert!(validate_repo_id("llava-hf/llava-1.5-7b-hf").is_ok());
        assert!(validate_repo_id("HuggingFaceH4/llava-instruct-mix-vsft").is_ok());
        assert!(validate_repo_id("a/b/c").is_err());
        assert!(validate_repo_id("a--b/c").is_err());
        assert!(validate_repo_id("./x").is_err());
        assert_eq!(origin("http://127.0.0.1:5/a/b"), "http://127.0.0.1:5");
    }
}
