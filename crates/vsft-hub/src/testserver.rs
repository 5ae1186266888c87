//! A Hub-compatible HTTP/1.1 server on loopback, **for tests only** (feature `test-server`).
//!
//! It implements the endpoints [`crate::HubClient`] uses, as the Hub answers them, and checks
//! what the client sends. Every failed check is answered with a 4xx status *and* recorded in
//! [`TestServer::violations`], which a test should assert empty at its end.
//!
//! | endpoint | checks |
//! |---|---|
//! | `POST /api/repos/create` | token; JSON `name`/`organization`/`visibility`/`type`; 409 when it exists |
//! | `POST /api/{type}s/{repo}/branch/{b}` | token; 409 when it exists |
//! | `POST /api/{type}s/{repo}/preupload/{rev}` | token; ≤256 files a request; base64 sample = first min(512, size) bytes |
//! | `POST {prefix}{repo}.git/info/lfs/objects/batch` | token; LFS `Accept`/`Content-Type`; `operation`, `transfers`, `hash_algo`, `ref`, oids |
//! | `PUT /lfs-up/{oid}` (basic) | **no** `authorization`; sha256(body) = oid; size as announced |
//! | `PUT /lfs-part/{oid}/{n}` | no `authorization`; part size = chunk size (last: remainder); answers an `ETag` |
//! | `POST /lfs-complete/{oid}` | no `authorization`; part count = ceil(size/chunk); part numbers; ETags verbatim; sha256 |
//! | `POST /lfs-verify/{oid}` | token; object stored with that size |
//! | `POST /api/{type}s/{repo}/commit/{rev}` | token; `application/x-ndjson`; header line first; base64 contents; lfsFile oid/size = stored object; makes a new commit sha |
//! | `GET /api/{type}s/{repo}/revision/{rev}` | private repos need the token; `sha`, `siblings` |
//! | `HEAD/GET {prefix}{repo}/resolve/{rev}/{path}` | regular files: 200 with `ETag`, `X-Repo-Commit`; LFS files: 302 to `/lfs-cdn/{oid}` with `X-Linked-Etag`, `X-Linked-Size` |
//! | `GET /api/{type}s/{repo}/tree/{rev}?recursive=true` | the listing `huggingface_hub` ≥ 1.x uses (one page) |
//! | `HEAD/GET /lfs-cdn/{oid}` | `Range: bytes=N-[M]` → 206 with `Content-Range` |
//! | `GET /_testserver/violations` | the violations so far, for clients in another process |
//!
//! Fault injection: [`TestServerConfig::fail_first`] / [`TestServer::fail_next`] answer the next
//! N requests with 503; [`TestServer::truncate_next_downloads`] cuts the next N blob downloads
//! in the middle (full `Content-Length`, half the body, connection closed).
//!
//! Presigned upload URLs and the CDN live on a second port (another origin, like S3 and the
//! CDN for the Hub), so clients must not send the token there, and `huggingface_hub` does not
//! follow the LFS redirect (it follows same-origin ones).
//!
//! Bounded: it stops by itself after [`TestServerConfig::lifetime`] or
//! [`TestServerConfig::max_connections`] connections, and when dropped. Regular-file ETags and
//! preupload oids are git blob sha1s, as on the Hub.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::RepoType;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const LFS_MIME: &str = "application/vnd.git-lfs+json";

/// Settings of a [`TestServer`].
#[derive(Clone, Debug)]
pub struct TestServerConfig {
    /// The one valid token (`authorization: Bearer {token}`).
    pub token: String,
    /// Preupload answers `lfs` for files of at least this size, or whose sample has a NUL byte.
    pub lfs_threshold: u64,
    /// LFS objects of at least this size get a multipart transfer (when the client offers it).
    pub multipart_threshold: u64,
    /// Part size of multipart transfers.
    pub chunk_size: u64,
    /// Answer the first N requests with 503.
    pub fail_first: usize,
    /// Stop accepting after this long.
    pub lifetime: Duration,
    /// Stop accepting after this many connections.
    pub max_connections: usize,
}

impl Default for TestServerConfig {
    fn default() -> Self {
        TestServerConfig {
            token: "hf_testtoken".into(),
            lfs_threshold: 10 * 1024 * 1024,
            multipart_threshold: 64 * 1024,
            chunk_size: 16 * 1024,
            fail_first: 0,
            lifetime: Duration::from_secs(300),
            max_connections: 5000,
        }
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// Whether an `authorization` header was present.
    pub has_auth: bool,
    /// The `range` header, if any.
    pub range: Option<String>,
    /// Status answered.
    pub status: u16,
}

#[derive(Clone)]
enum Entry {
    Regular(Arc<Vec<u8>>),
    Lfs(String),
}

struct Repo {
    private: bool,
    branches: BTreeMap<String, String>,
    commits: HashMap<String, BTreeMap<String, Entry>>,
}

struct Multipart {
    size: u64,
    chunk: u64,
    parts: BTreeMap<u32, (Vec<u8>, String)>,
}

#[derive(Default)]
struct State {
    repos: HashMap<(RepoType, String), Repo>,
    objects: HashMap<String, Arc<Vec<u8>>>,
    pending_basic: HashMap<String, u64>,
    multipart: HashMap<String, Multipart>,
    log: Vec<RequestRecord>,
    fail_paths: Vec<(String, String, usize)>,
    violations: Vec<String>,
    counter: u64,
}

struct Shared {
    cfg: TestServerConfig,
    base: String,
    /// Origin of the "storage" (presigned upload URLs and the download CDN): another port, so
    /// another origin, as S3/CloudFront are for the Hub.
    storage: String,
    state: Mutex<State>,
    stop: AtomicBool,
    fail: AtomicUsize,
    truncate: AtomicUsize,
}

/// A running test Hub; stops when dropped.
pub struct TestServer {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then close.
    cut: Option<usize>,
}

impl Response {
    fn new(status: u16) -> Self {
        Response { status, headers: Vec::new(), body: Vec::new(), cut: None }
    }
    fn json(status: u16, v: Value) -> Self {
        let mut r = Response::new(status);
        r.body = serde_json::to_vec(&v).unwrap();
        r.h("content-type", "application/json")
    }
    fn h(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    fn err(status: u16, code: &str, msg: &str) -> Self {
        let r = Response::json(status, json!({ "error": msg })).h("x-error-message", msg);
        if code.is_empty() {
            r
        } else {
            r.h("x-error-code", code)
        }
    }
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

fn is_oid(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Git blob id, as the Hub's ETag and preupload oid of regular files.
fn regular_etag(data: &[u8]) -> String {
    use sha1::Digest as _;
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    h.finalize().iter().map(|x| format!("{x:02x}")).collect()
}

fn repo_type_of(plural: &str) -> Option<RepoType> {
    match plural {
        "models" => Some(RepoType::Model),
        "datasets" => Some(RepoType::Dataset),
        "spaces" => Some(RepoType::Space),
        _ => None,
    }
}

impl TestServer {
    /// Starts a server on `127.0.0.1` with an ephemeral port.
    pub fn start(cfg: TestServerConfig) -> TestServer {
        let bind = || {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            l.set_nonblocking(true).expect("nonblocking");
            let origin = format!("http://{}", l.local_addr().unwrap());
            (l, origin)
        };
        let (hub_listener, base) = bind();
        let (storage_listener, storage) = bind();
        let shared = Arc::new(Shared {
            fail: AtomicUsize::new(cfg.fail_first),
            truncate: AtomicUsize::new(0),
            cfg,
            base,
            storage,
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let accept = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut conns = 0usize;
            while !sh.stop.load(Ordering::SeqCst) && t0.elapsed() < sh.cfg.lifetime && conns < sh.cfg.max_connections {
                let mut idle = true;
                for (listener, is_storage) in [(&hub_listener, false), (&storage_listener, true)] {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            idle = false;
                            conns += 1;
                            let sh = sh.clone();
                            std::thread::spawn(move || serve_conn(stream, &sh, is_storage));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        TestServer { shared, accept: Some(accept) }
    }

    /// `http://127.0.0.1:{port}`, to use as `HubConfig::endpoint`.
    pub fn endpoint(&self) -> String {
        self.shared.base.clone()
    }

    /// Origin of presigned upload URLs and of the download CDN (another port).
    pub fn storage_endpoint(&self) -> String {
        self.shared.storage.clone()
    }

    /// The valid token.
    pub fn token(&self) -> String {
        self.shared.cfg.token.clone()
    }

    /// Requests seen so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.state.lock().unwrap().log.clone()
    }

    /// Protocol violations seen so far (empty for a well-behaved client).
    pub fn violations(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().violations.clone()
    }

    /// Answer the next `n` requests with 503.
    pub fn fail_next(&self, n: usize) {
        self.shared.fail.store(n, Ordering::SeqCst);
    }

    /// Answer the next `n` requests with this method whose path starts with `prefix` with 503
    /// (e.g. `("PUT", "/lfs-part/")` to fail multipart part uploads).
    pub fn fail_next_matching(&self, method: &str, prefix: &str, n: usize) {
        self.shared.state.lock().unwrap().fail_paths.push((method.to_string(), prefix.to_string(), n));
    }

    /// Cut the next `n` blob downloads (`resolve` of regular files, `/lfs-cdn/`) halfway.
    pub fn truncate_next_downloads(&self, n: usize) {
        self.shared.truncate.store(n, Ordering::SeqCst);
    }

    /// Creates the repo if needed (public) and commits `files` to `main` (LFS for files the
    /// preupload rule would send to LFS). Returns the commit sha.
    pub fn seed(&self, repo_type: RepoType, repo_id: &str, files: &[(&str, &[u8])]) -> String {
        let mut st = self.shared.state.lock().unwrap();
        ensure_repo(&mut st, repo_type, repo_id, false);
        let mut changes = BTreeMap::new();
        for (p, data) in files {
            let e = if self.shared.lfs_mode(data.len() as u64, &data[..data.len().min(512)]) {
                let oid = sha256_hex(data);
                st.objects.insert(oid.clone(), Arc::new(data.to_vec()));
                Entry::Lfs(oid)
            } else {
                Entry::Regular(Arc::new(data.to_vec()))
            };
            changes.insert(p.to_string(), Some(e));
        }
        commit(&mut st, repo_type, repo_id, "main", changes, b"seed")
    }

    /// Contents of the files of `revision` (branch or commit), LFS files resolved.
    pub fn files(&self, repo_type: RepoType, repo_id: &str, revision: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        let st = self.shared.state.lock().unwrap();
        let repo = st.repos.get(&(repo_type, repo_id.to_string()))?;
        let sha = resolve_rev(repo, revision)?;
        let files = repo.commits.get(&sha)?;
        Some(
            files
                .iter()
                .map(|(p, e)| {
                    let data = match e {
                        Entry::Regular(d) => d.to_vec(),
                        Entry::Lfs(oid) => st.objects.get(oid).map(|d| d.to_vec()).unwrap_or_default(),
                    };
                    (p.clone(), data)
                })
                .collect(),
        )
    }

    /// Paths stored through LFS at `revision`.
    pub fn lfs_paths(&self, repo_type: RepoType, repo_id: &str, revision: &str) -> Vec<String> {
        let st = self.shared.state.lock().unwrap();
        let Some(repo) = st.repos.get(&(repo_type, repo_id.to_string())) else { return vec![] };
        let Some(files) = resolve_rev(repo, revision).and_then(|s| repo.commits.get(&s)) else { return vec![] };
        files.iter().filter(|(_, e)| matches!(e, Entry::Lfs(_))).map(|(p, _)| p.clone()).collect()
    }

    /// Commit sha a branch points to.
    pub fn head(&self, repo_type: RepoType, repo_id: &str, branch: &str) -> Option<String> {
        let st = self.shared.state.lock().unwrap();
        st.repos.get(&(repo_type, repo_id.to_string()))?.branches.get(branch).cloned()
    }

    /// Whether the repo exists and is private.
    pub fn is_private(&self, repo_type: RepoType, repo_id: &str) -> Option<bool> {
        let st = self.shared.state.lock().unwrap();
        st.repos.get(&(repo_type, repo_id.to_string())).map(|r| r.private)
    }

    /// Stops accepting connections.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn ensure_repo(st: &mut State, rt: RepoType, id: &str, private: bool) -> bool {
    let key = (rt, id.to_string());
    if st.repos.contains_key(&key) {
        return false;
    }
    let mut files = BTreeMap::new();
    files.insert(
        ".gitattributes".to_string(),
        Entry::Regular(Arc::new(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n".to_vec())),
    );
    st.counter += 1;
    let sha = sha256_hex(format!("init {id} {}", st.counter).as_bytes())[..40].to_string();
    let mut commits = HashMap::new();
    commits.insert(sha.clone(), files);
    let mut branches = BTreeMap::new();
    branches.insert("main".to_string(), sha);
    st.repos.insert(key, Repo { private, branches, commits });
    true
}

fn resolve_rev(repo: &Repo, rev: &str) -> Option<String> {
    if let Some(s) = repo.branches.get(rev) {
        return Some(s.clone());
    }
    repo.commits.contains_key(rev).then(|| rev.to_string())
}

/// Applies `changes` (None = delete) on top of `branch` and moves it. Returns the new sha.
fn commit(
    st: &mut State,
    rt: RepoType,
    id: &str,
    branch: &str,
    changes: BTreeMap<String, Option<Entry>>,
    salt: &[u8],
) -> String {
    st.counter += 1;
    let counter = st.counter;
    let repo = st.repos.get_mut(&(rt, id.to_string())).expect("repo");
    let parent = repo.branches.get(branch).cloned().unwrap_or_default();
    let mut files = repo.commits.get(&parent).cloned().unwrap_or_default();
    for (p, e) in changes {
        match e {
            Some(e) => {
                files.insert(p, e);
            }
            None => {
                files.remove(&p);
            }
        }
    }
    let mut h = Sha256::new();
    h.update(parent.as_bytes());
    h.update(salt);
    h.update(counter.to_le_bytes());
    let sha: String = h.finalize().iter().take(20).map(|x| format!("{x:02x}")).collect();
    repo.commits.insert(sha.clone(), files);
    repo.branches.insert(branch.to_string(), sha.clone());
    sha
}

fn read_request(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "bad request line"));
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            return Ok(None);
        }
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        if headers.len() > 200 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "too many headers"));
        }
    }
    let mut req = Request { method, target, headers, body: Vec::new() };
    if let Some(te) = req.header("transfer-encoding") {
        if te.to_ascii_lowercase().contains("chunked") {
            // Presigned-URL stores (S3) refuse chunked uploads: the client must send Content-Length.
            req.headers.push(("x-chunked".into(), "1".into()));
            return Ok(Some(req));
        }
    }
    let len: usize = req.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    if len > 512 << 20 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "body too large"));
    }
    req.body = vec![0; len];
    r.read_exact(&mut req.body)?;
    Ok(Some(req))
}

fn serve_conn(stream: TcpStream, sh: &Shared, storage: bool) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_nodelay(true);
    let Ok(wstream) = stream.try_clone() else { return };
    let mut w = wstream;
    let mut r = BufReader::new(stream);
    for _ in 0..10_000 {
        let req = match read_request(&mut r) {
            Ok(Some(req)) => req,
            _ => return,
        };
        let chunked = req.header("x-chunked").is_some();
        let resp = if chunked {
            sh.violation(&req, "chunked transfer encoding: send Content-Length".into());
            Response::err(411, "", "Content-Length required")
        } else if sh.fail.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
            || sh.take_path_failure(&req)
        {
            Response::err(503, "", "injected failure")
        } else {
            let path = req.target.split('?').next().unwrap_or("");
            let storage_path = ["/lfs-up/", "/lfs-part/", "/lfs-cdn/"].iter().any(|p| path.starts_with(p));
            if storage_path == storage {
                sh.route(&req)
            } else {
                Response::err(404, "", "wrong origin for this path")
            }
        };
        {
            let mut st = sh.state.lock().unwrap();
            st.log.push(RequestRecord {
                method: req.method.clone(),
                path: req.target.clone(),
                has_auth: req.header("authorization").is_some(),
                range: req.header("range").map(str::to_string),
                status: resp.status,
            });
        }
        let reason = match resp.status {
            200 => "OK",
            206 => "Partial Content",
            302 => "Found",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            409 => "Conflict",
            411 => "Length Required",
            416 => "Range Not Satisfiable",
            503 => "Service Unavailable",
            _ => "Status",
        };
        let mut head = format!("HTTP/1.1 {} {reason}\r\n", resp.status);
        for (k, v) in &resp.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("content-length: {}\r\n", resp.body.len()));
        if chunked || resp.cut.is_some() {
            head.push_str("connection: close\r\n");
        }
        head.push_str("\r\n");
        let body: &[u8] = if req.method == "HEAD" { &[] } else { &resp.body[..resp.cut.unwrap_or(resp.body.len())] };
        if w.write_all(head.as_bytes()).and_then(|_| w.write_all(body)).and_then(|_| w.flush()).is_err() {
            return;
        }
        if chunked || resp.cut.is_some() || req.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
            let _ = w.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

enum Auth {
    None,
    Valid,
    Invalid,
}

impl Shared {
    fn take_path_failure(&self, req: &Request) -> bool {
        let mut st = self.state.lock().unwrap();
        for (m, prefix, n) in st.fail_paths.iter_mut() {
            if *n > 0 && *m == req.method && req.target.starts_with(prefix.as_str()) {
                *n -= 1;
                return true;
            }
        }
        false
    }

    fn violation(&self, req: &Request, msg: String) {
        self.state.lock().unwrap().violations.push(format!("{} {}: {msg}", req.method, req.target));
    }

    /// Records a violation and answers 400 with it.
    fn bad(&self, req: &Request, msg: impl Into<String>) -> Response {
        let msg = msg.into();
        self.violation(req, msg.clone());
        Response::err(400, "", &msg)
    }

    fn lfs_mode(&self, size: u64, sample: &[u8]) -> bool {
        size > 0 && (size >= self.cfg.lfs_threshold || sample.contains(&0))
    }

    fn auth(&self, req: &Request) -> Auth {
        match req.header("authorization") {
            None => Auth::None,
            Some(v) if v.strip_prefix("Bearer ") == Some(self.cfg.token.as_str()) => Auth::Valid,
            Some(_) => Auth::Invalid,
        }
    }

    /// `Some(response)` when the request may not write.
    fn need_write(&self, req: &Request) -> Option<Response> {
        match self.auth(req) {
            Auth::Valid => None,
            Auth::Invalid => Some(Response::err(401, "", "Invalid credentials in Authorization header")),
            Auth::None => Some(Response::err(401, "", "Authorization header is required")),
        }
    }

    fn route(&self, req: &Request) -> Response {
        let path = req.target.split('?').next().unwrap_or("");
        let segs: Vec<String> = path.trim_start_matches('/').split('/').map(pct_decode).collect();
        let s: Vec<&str> = segs.iter().map(String::as_str).collect();
        let m = req.method.as_str();
        if matches!(self.auth(req), Auth::Invalid) && !path.starts_with("/lfs-") {
            return Response::err(401, "", "Invalid credentials in Authorization header");
        }
        match (m, s.as_slice()) {
            ("POST", ["api", "repos", "create"]) => self.create_repo(req),
            (_, ["api", t, o, n, action, rest @ ..]) if repo_type_of(t).is_some() && !rest.is_empty() => {
                let rt = repo_type_of(t).unwrap();
                let id = format!("{o}/{n}");
                let rev = rest.join("/");
                match (m, *action) {
                    ("GET", "revision") => self.revision(req, rt, &id, &rev),
                    ("GET", "tree") => self.tree(req, rt, &id, &rev),
                    ("POST", "preupload") => self.preupload(req, rt, &id, &rev),
                    ("POST", "commit") => self.commit(req, rt, &id, &rev),
                    ("POST", "branch") => self.branch(req, rt, &id, &rev),
                    _ => Response::err(404, "", "no such endpoint"),
                }
            }
            ("GET", ["_testserver", "violations"]) => {
                Response::json(200, json!(self.state.lock().unwrap().violations.clone()))
            }
            ("PUT", ["lfs-up", oid]) => self.put_basic(req, oid),
            ("PUT", ["lfs-part", oid, n]) => self.put_part(req, oid, n),
            ("POST", ["lfs-complete", oid]) => self.complete(req, oid),
            ("POST", ["lfs-verify", oid]) => self.verify(req, oid),
            ("GET" | "HEAD", ["lfs-cdn", oid]) => {
                let data = self.state.lock().unwrap().objects.get(*oid).cloned();
                match data {
                    Some(d) => self.serve_bytes(req, &d, oid),
                    None => Response::err(404, "", "no such object"),
                }
            }
            _ => {
                let (rt, rest) = match s.first() {
                    Some(&"datasets") => (RepoType::Dataset, &s[1..]),
                    Some(&"spaces") => (RepoType::Space, &s[1..]),
                    _ => (RepoType::Model, &s[..]),
                };
                match (m, rest) {
                    ("POST", [o, n, "info", "lfs", "objects", "batch"]) if n.ends_with(".git") => {
                        self.batch(req, rt, &format!("{o}/{}", n.trim_end_matches(".git")))
                    }
                    ("GET" | "HEAD", [o, n, "resolve", rev, file @ ..]) if !file.is_empty() => {
                        self.resolve(req, rt, &format!("{o}/{n}"), rev, &file.join("/"))
                    }
                    _ => Response::err(404, "", "no such endpoint"),
                }
            }
        }
    }

    fn create_repo(&self, req: &Request) -> Response {
        if let Some(r) = self.need_write(req) {
            return r;
        }
        let Ok(v) = serde_json::from_slice::<Value>(&req.body) else { return self.bad(req, "body is not JSON") };
        let Some(name) = v.get("name").and_then(Value::as_str) else { return self.bad(req, "missing name") };
        let rt = match v.get("type").and_then(Value::as_str) {
            None => RepoType::Model,
            Some("dataset") => RepoType::Dataset,
            Some("space") => RepoType::Space,
            Some("model") => return self.bad(req, "type is only sent for non-model repos"),
            Some(t) => return self.bad(req, format!("bad type {t:?}")),
        };
        let private = match (v.get("visibility").and_then(Value::as_str), v.get("private").and_then(Value::as_bool)) {
            (Some("private"), _) | (None, Some(true)) => true,
            (Some("public"), _) | (None, Some(false)) | (None, None) => false,
            (Some(x), _) => return self.bad(req, format!("bad visibility {x:?}")),
        };
        let Some(org) = v.get("organization").and_then(Value::as_str) else {
            return self.bad(req, "test server needs an organization (owner/name ids)");
        };
        let id = format!("{org}/{name}");
        let url = format!("{}/{}{id}", self.base, rt.url_prefix());
        let mut st = self.state.lock().unwrap();
        if ensure_repo(&mut st, rt, &id, private) {
            Response::json(200, json!({ "url": url }))
        } else {
            Response::json(409, json!({ "error": "You already created this repo", "url": url }))
        }
    }

    /// Checks the repo exists and may be read; returns the commit sha of `rev`.
    fn readable(&self, req: &Request, st: &State, rt: RepoType, id: &str, rev: &str) -> Result<String, Response> {
        let Some(repo) = st.repos.get(&(rt, id.to_string())) else {
            return Err(Response::err(404, "RepoNotFound", "Repository not found"));
        };
        if repo.private && !matches!(self.auth(req), Auth::Valid) {
            return Err(Response::err(401, "RepoNotFound", "Repository not found"));
        }
        resolve_rev(repo, rev).ok_or_else(|| Response::err(404, "RevisionNotFound", &format!("Invalid rev id: {rev}")))
    }

    /// Write checks: token, repo, branch. Returns the head sha of the branch.
    fn writable(&self, req: &Request, st: &State, rt: RepoType, id: &str, branch: &str) -> Result<String, Response> {
        if let Some(r) = self.need_write(req) {
            return Err(r);
        }
        let Some(repo) = st.repos.get(&(rt, id.to_string())) else {
            return Err(Response::err(404, "RepoNotFound", "Repository not found"));
        };
        repo.branches
            .get(branch)
            .cloned()
            .ok_or_else(|| Response::err(404, "RevisionNotFound", &format!("Invalid rev id: {branch}")))
    }

    fn revision(&self, req: &Request, rt: RepoType, id: &str, rev: &str) -> Response {
        let st = self.state.lock().unwrap();
        let sha = match self.readable(req, &st, rt, id, rev) {
            Ok(s) => s,
            Err(r) => return r,
        };
        let repo = &st.repos[&(rt, id.to_string())];
        let siblings: Vec<Value> = repo.commits[&sha].keys().map(|p| json!({ "rfilename": p })).collect();
        Response::json(200, json!({ "id": id, "sha": sha, "private": repo.private, "siblings": siblings }))
    }

    /// `GET /api/{type}s/{repo}/tree/{rev}[/{path}]?recursive=…`: one page, entries as the Hub
    /// lists them (`huggingface_hub` ≥ 1.x lists files this way in `snapshot_download`).
    fn tree(&self, req: &Request, rt: RepoType, id: &str, rev_and_path: &str) -> Response {
        let (rev, prefix) = match rev_and_path.split_once('/') {
            Some((r, p)) => (r, p.trim_end_matches('/')),
            None => (rev_and_path, ""),
        };
        let recursive = req.target.split('?').nth(1).is_some_and(|q| {
            q.split('&').any(|kv| matches!(kv.to_ascii_lowercase().as_str(), "recursive=true" | "recursive=1"))
        });
        let st = self.state.lock().unwrap();
        let sha = match self.readable(req, &st, rt, id, rev) {
            Ok(s) => s,
            Err(r) => return r,
        };
        let files = &st.repos[&(rt, id.to_string())].commits[&sha];
        let base = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        let mut dirs = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for (p, e) in files {
            let Some(rest) = p.strip_prefix(&base) else { continue };
            if let Some((d, _)) = rest.split_once('/') {
                if !recursive {
                    dirs.insert(format!("{base}{d}"));
                    continue;
                }
                let mut acc = base.clone();
                for c in rest.split('/').collect::<Vec<_>>().iter().rev().skip(1).rev() {
                    acc.push_str(c);
                    dirs.insert(acc.clone());
                    acc.push('/');
                }
            }
            out.push(match e {
                Entry::Regular(d) => json!({"type": "file", "oid": regular_etag(d), "size": d.len(), "path": p}),
                Entry::Lfs(oid) => {
                    let size = st.objects.get(oid).map(|d| d.len()).unwrap_or(0);
                    let pointer =
                        format!("version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n");
                    json!({"type": "file", "oid": regular_etag(pointer.as_bytes()), "size": size, "path": p,
                           "lfs": {"oid": oid, "size": size, "pointerSize": pointer.len()}})
                }
            });
        }
        let mut all: Vec<Value> = dirs
            .into_iter()
            .map(|d| json!({"type": "directory", "oid": "0".repeat(40), "size": 0, "path": d}))
            .collect();
        all.extend(out);
        Response::json(200, Value::Array(all))
    }

    fn branch(&self, req: &Request, rt: RepoType, id: &str, branch: &str) -> Response {
        let mut st = self.state.lock().unwrap();
        let head = match self.writable(req, &st, rt, id, "main") {
            Ok(h) => h,
            Err(r) => return r,
        };
        let repo = st.repos.get_mut(&(rt, id.to_string())).unwrap();
        if repo.branches.contains_key(branch) {
            return Response::err(409, "", "Reference already exists");
        }
        repo.branches.insert(branch.to_string(), head);
        Response::json(200, json!({}))
    }

    fn preupload(&self, req: &Request, rt: RepoType, id: &str, rev: &str) -> Response {
        let st = self.state.lock().unwrap();
        let head = match self.writable(req, &st, rt, id, rev) {
            Ok(h) => h,
            Err(r) => return r,
        };
        let existing = st.repos[&(rt, id.to_string())].commits[&head].clone();
        drop(st);
        let Ok(v) = serde_json::from_slice::<Value>(&req.body) else { return self.bad(req, "body is not JSON") };
        let Some(files) = v.get("files").and_then(Value::as_array) else { return self.bad(req, "missing files") };
        if files.is_empty() || files.len() > 256 {
            return self.bad(req, format!("{} files in one preupload request (1..=256)", files.len()));
        }
        let mut out = Vec::new();
        for f in files {
            let (Some(path), Some(size), Some(sample)) = (
                f.get("path").and_then(Value::as_str),
                f.get("size").and_then(Value::as_u64),
                f.get("sample").and_then(Value::as_str),
            ) else {
                return self.bad(req, format!("file entry needs path, size, sample: {f}"));
            };
            if path.starts_with('/') || path.split('/').any(|c| c == ".." || c.is_empty()) {
                return self.bad(req, format!("bad path {path:?}"));
            }
            let Ok(sample) = B64.decode(sample) else { return self.bad(req, format!("{path}: sample is not base64")) };
            if sample.len() as u64 != size.min(512) {
                return self.bad(req, format!("{path}: sample has {} bytes, expected min(512, {size})", sample.len()));
            }
            let lfs = self.lfs_mode(size, &sample);
            let oid = match existing.get(path) {
                Some(Entry::Lfs(o)) => Value::String(o.clone()),
                Some(Entry::Regular(d)) => Value::String(regular_etag(d)),
                None => Value::Null,
            };
            out.push(json!({"path": path, "uploadMode": if lfs { "lfs" } else { "regular" }, "shouldIgnore": false, "oid": oid}));
        }
        Response::json(200, json!({ "files": out }))
    }

    fn batch(&self, req: &Request, rt: RepoType, id: &str) -> Response {
        {
            let st = self.state.lock().unwrap();
            if let Some(r) = self.need_write(req) {
                return r;
            }
            if !st.repos.contains_key(&(rt, id.to_string())) {
                return Response::err(404, "RepoNotFound", "Repository not found");
            }
        }
        if req.header("accept") != Some(LFS_MIME) || req.header("content-type") != Some(LFS_MIME) {
            return self.bad(req, format!("Accept and Content-Type must be {LFS_MIME}"));
        }
        let Ok(v) = serde_json::from_slice::<Value>(&req.body) else { return self.bad(req, "body is not JSON") };
        if v.get("operation").and_then(Value::as_str) != Some("upload") {
            return self.bad(req, "operation must be upload");
        }
        let transfers: Vec<&str> = v
            .get("transfers")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !transfers.contains(&"basic") {
            return self.bad(req, "transfers must include basic");
        }
        if v.get("hash_algo").and_then(Value::as_str).is_some_and(|h| h != "sha256") {
            return self.bad(req, "hash_algo must be sha256");
        }
        if v.pointer("/ref/name").and_then(Value::as_str).is_none() {
            return self.bad(req, "missing ref.name");
        }
        let Some(objects) = v.get("objects").and_then(Value::as_array) else { return self.bad(req, "missing objects") };
        if objects.is_empty() || objects.len() > 1000 {
            return self.bad(req, "1..=1000 objects per batch");
        }
        let multipart_ok = transfers.contains(&"multipart");
        let mut st = self.state.lock().unwrap();
        let mut out = Vec::new();
        let mut transfer = "basic";
        for o in objects {
            let (Some(oid), Some(size)) = (o.get("oid").and_then(Value::as_str), o.get("size").and_then(Value::as_u64))
            else {
                drop(st);
                return self.bad(req, format!("object needs oid and size: {o}"));
            };
            if !is_oid(oid) {
                drop(st);
                return self.bad(req, format!("oid {oid:?} is not a lowercase sha256 hex"));
            }
            if let Some(d) = st.objects.get(oid) {
                if d.len() as u64 == size {
                    out.push(json!({"oid": oid, "size": size}));
                    continue;
                }
            }
            let verify = json!({"href": format!("{}/lfs-verify/{oid}", self.base), "header": {}});
            if multipart_ok && size >= self.cfg.multipart_threshold {
                transfer = "multipart";
                let chunk = self.cfg.chunk_size;
                let n = size.div_ceil(chunk);
                let mut header = serde_json::Map::new();
                header.insert("chunk_size".into(), json!(chunk.to_string()));
                for i in 1..=n {
                    header.insert(format!("{i:05}"), json!(format!("{}/lfs-part/{oid}/{i}", self.storage)));
                }
                st.multipart.insert(oid.to_string(), Multipart { size, chunk, parts: BTreeMap::new() });
                out.push(json!({"oid": oid, "size": size, "authenticated": true, "actions": {
                    "upload": {"href": format!("{}/lfs-complete/{oid}", self.base), "header": header},
                    "verify": verify}}));
            } else {
                st.pending_basic.insert(oid.to_string(), size);
                out.push(json!({"oid": oid, "size": size, "authenticated": true, "actions": {
                    "upload": {"href": format!("{}/lfs-up/{oid}", self.storage)},
                    "verify": verify}}));
            }
        }
        let mut r = Response::json(200, json!({"transfer": transfer, "objects": out}));
        r.headers.retain(|(k, _)| k != "content-type");
        r.h("content-type", LFS_MIME)
    }

    fn no_auth_upload(&self, req: &Request) -> Option<Response> {
        req.header("authorization")
            .is_some()
            .then(|| self.bad(req, "authorization header sent to a presigned upload URL"))
    }

    fn put_basic(&self, req: &Request, oid: &str) -> Response {
        if let Some(r) = self.no_auth_upload(req) {
            return r;
        }
        let expected = self.state.lock().unwrap().pending_basic.get(oid).copied();
        let Some(size) = expected else { return self.bad(req, "no basic upload pending for this oid") };
        if req.body.len() as u64 != size {
            return self.bad(req, format!("uploaded {} bytes, batch announced {size}", req.body.len()));
        }
        if sha256_hex(&req.body) != oid {
            return self.bad(req, "sha256 of the uploaded bytes != oid");
        }
        let mut st = self.state.lock().unwrap();
        st.pending_basic.remove(oid);
        st.objects.insert(oid.to_string(), Arc::new(req.body.clone()));
        Response::new(200)
    }

    fn put_part(&self, req: &Request, oid: &str, n: &str) -> Response {
        if let Some(r) = self.no_auth_upload(req) {
            return r;
        }
        let Ok(n) = n.parse::<u32>() else { return self.bad(req, "bad part number") };
        let mut st = self.state.lock().unwrap();
        let Some(mp) = st.multipart.get_mut(oid) else {
            drop(st);
            return self.bad(req, "no multipart upload pending for this oid");
        };
        let count = mp.size.div_ceil(mp.chunk);
        if n == 0 || n as u64 > count {
            drop(st);
            return self.bad(req, format!("part {n} out of 1..={count}"));
        }
        let expected = mp.chunk.min(mp.size - (n as u64 - 1) * mp.chunk);
        if req.body.len() as u64 != expected {
            let got = req.body.len();
            drop(st);
            return self.bad(req, format!("part {n} has {got} bytes, expected {expected}"));
        }
        let etag = format!("\"{}\"", &sha256_hex(&req.body)[..32]);
        mp.parts.insert(n, (req.body.clone(), etag.clone()));
        Response::new(200).h("etag", etag)
    }

    fn complete(&self, req: &Request, oid: &str) -> Response {
        if let Some(r) = self.no_auth_upload(req) {
            return r;
        }
        if req.header("content-type") != Some(LFS_MIME) {
            return self.bad(req, format!("completion Content-Type must be {LFS_MIME}"));
        }
        let Ok(v) = serde_json::from_slice::<Value>(&req.body) else { return self.bad(req, "body is not JSON") };
        if v.get("oid").and_then(Value::as_str) != Some(oid) {
            return self.bad(req, "completion oid does not match the upload");
        }
        let Some(parts) = v.get("parts").and_then(Value::as_array) else { return self.bad(req, "missing parts") };
        let mut st = self.state.lock().unwrap();
        let Some(mp) = st.multipart.get(oid) else {
            drop(st);
            return self.bad(req, "no multipart upload pending for this oid");
        };
        let count = mp.size.div_ceil(mp.chunk) as usize;
        let mut problems = Vec::new();
        if parts.len() != count {
            problems.push(format!("{} parts listed, expected ceil({}/{}) = {count}", parts.len(), mp.size, mp.chunk));
        }
        if mp.parts.len() != count {
            problems.push(format!("{} parts uploaded, expected {count}", mp.parts.len()));
        }
        for (i, p) in parts.iter().enumerate() {
            let num = p.get("partNumber").and_then(Value::as_u64);
            let etag = p.get("etag").and_then(Value::as_str);
            if num != Some(i as u64 + 1) {
                problems.push(format!("parts[{i}].partNumber = {num:?}, expected {}", i + 1));
                continue;
            }
            match (etag, mp.parts.get(&(i as u32 + 1))) {
                (Some(e), Some((_, stored))) if e == stored => {}
                (e, stored) => problems.push(format!("part {}: etag {e:?} != {:?}", i + 1, stored.map(|s| &s.1))),
            }
        }
        let mut data = Vec::with_capacity(mp.size as usize);
        for (_, (d, _)) in mp.parts.iter() {
            data.extend_from_slice(d);
        }
        if problems.is_empty() && (data.len() as u64 != mp.size || sha256_hex(&data) != oid) {
            problems.push("assembled object does not match oid/size".into());
        }
        if !problems.is_empty() {
            drop(st);
            return self.bad(req, problems.join("; "));
        }
        st.multipart.remove(oid);
        st.objects.insert(oid.to_string(), Arc::new(data));
        Response::json(200, json!({}))
    }

    fn verify(&self, req: &Request, oid: &str) -> Response {
        if !matches!(self.auth(req), Auth::Valid) {
            return self.bad(req, "verify needs the token");
        }
        let Ok(v) = serde_json::from_slice::<Value>(&req.body) else { return self.bad(req, "body is not JSON") };
        let size = v.get("size").and_then(Value::as_u64);
        if v.get("oid").and_then(Value::as_str) != Some(oid) {
            return self.bad(req, "verify oid does not match the URL");
        }
        let stored = self.state.lock().unwrap().objects.get(oid).map(|d| d.len() as u64);
        match stored {
            Some(s) if Some(s) == size => Response::json(200, json!({"oid": oid, "size": s})),
            _ => {
                self.violation(req, format!("verify of an object not stored with size {size:?}"));
                Response::err(404, "", "object not found")
            }
        }
    }

    fn commit(&self, req: &Request, rt: RepoType, id: &str, branch: &str) -> Response {
        {
            let st = self.state.lock().unwrap();
            if let Err(r) = self.writable(req, &st, rt, id, branch) {
                return r;
            }
        }
        if !req.header("content-type").is_some_and(|c| c.starts_with("application/x-ndjson")) {
            return self.bad(req, "commit Content-Type must be application/x-ndjson");
        }
        let Ok(text) = std::str::from_utf8(&req.body) else { return self.bad(req, "commit body is not UTF-8") };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut changes: BTreeMap<String, Option<Entry>> = BTreeMap::new();
        let st = self.state.lock().unwrap();
        let mut problems = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            let Ok(v) = serde_json::from_str::<Value>(l) else {
                problems.push(format!("line {i} is not JSON"));
                continue;
            };
            let key = v.get("key").and_then(Value::as_str).unwrap_or("");
            let val = v.get("value").cloned().unwrap_or(Value::Null);
            if i == 0 {
                if key != "header" || val.get("summary").and_then(Value::as_str).is_none_or(|s| s.is_empty()) {
                    problems.push("first line must be {\"key\":\"header\",\"value\":{\"summary\":…}}".into());
                }
                continue;
            }
            let path = val.get("path").and_then(Value::as_str).unwrap_or("").to_string();
            if path.is_empty() || path.starts_with('/') || path.split('/').any(|c| c == "..") {
                problems.push(format!("line {i}: bad path {path:?}"));
                continue;
            }
            if changes.contains_key(&path) {
                problems.push(format!("line {i}: {path} appears twice"));
            }
            match key {
                "file" => {
                    if val.get("encoding").and_then(Value::as_str) != Some("base64") {
                        problems.push(format!("line {i}: encoding must be base64"));
                    }
                    match val.get("content").and_then(Value::as_str).map(|c| B64.decode(c)) {
                        Some(Ok(d)) => {
                            changes.insert(path, Some(Entry::Regular(Arc::new(d))));
                        }
                        _ => problems.push(format!("line {i}: content is not base64")),
                    }
                }
                "lfsFile" => {
                    let oid = val.get("oid").and_then(Value::as_str).unwrap_or("");
                    let size = val.get("size").and_then(Value::as_u64);
                    if val.get("algo").and_then(Value::as_str) != Some("sha256") {
                        problems.push(format!("line {i}: algo must be sha256"));
                    }
                    match st.objects.get(oid) {
                        Some(d) if Some(d.len() as u64) == size => {
                            changes.insert(path, Some(Entry::Lfs(oid.to_string())));
                        }
                        Some(d) => problems.push(format!("line {i}: {path}: size {size:?} != stored {}", d.len())),
                        None => problems.push(format!("line {i}: {path}: LFS object {oid} was never uploaded")),
                    }
                }
                "deletedFile" => {
                    changes.insert(path, None);
                }
                "deletedFolder" => {
                    let head = self.writable(req, &st, rt, id, branch).unwrap_or_default();
                    let prefix = format!("{}/", path.trim_end_matches('/'));
                    for p in st.repos[&(rt, id.to_string())].commits[&head].keys() {
                        if p.starts_with(&prefix) {
                            changes.insert(p.clone(), None);
                        }
                    }
                }
                k => problems.push(format!("line {i}: unknown key {k:?}")),
            }
        }
        if lines.len() < 2 {
            problems.push("commit has no operations".into());
        }
        drop(st);
        if !problems.is_empty() {
            return self.bad(req, problems.join("; "));
        }
        let mut st = self.state.lock().unwrap();
        let sha = commit(&mut st, rt, id, branch, changes, &req.body);
        Response::json(
            200,
            json!({"commitUrl": format!("{}/{}{id}/commit/{sha}", self.base, rt.url_prefix()), "commitOid": sha, "pullRequestUrl": null}),
        )
    }

    fn resolve(&self, req: &Request, rt: RepoType, id: &str, rev: &str, path: &str) -> Response {
        let st = self.state.lock().unwrap();
        let sha = match self.readable(req, &st, rt, id, rev) {
            Ok(s) => s,
            Err(r) => return r,
        };
        let entry = st.repos[&(rt, id.to_string())].commits[&sha].get(path).cloned();
        drop(st);
        match entry {
            None => Response::err(404, "EntryNotFound", &format!("{path} does not exist at {rev}")),
            Some(Entry::Regular(d)) => self.serve_bytes(req, &d, &regular_etag(&d)).h("x-repo-commit", sha),
            Some(Entry::Lfs(oid)) => {
                let size = self.state.lock().unwrap().objects.get(&oid).map(|d| d.len()).unwrap_or(0);
                let pointer = format!("version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n");
                Response::new(302)
                    .h("location", format!("{}/lfs-cdn/{oid}", self.storage))
                    .h("x-repo-commit", sha)
                    .h("x-linked-etag", format!("\"{oid}\""))
                    .h("x-linked-size", size.to_string())
                    .h("etag", format!("\"{}\"", regular_etag(pointer.as_bytes())))
            }
        }
    }

    /// 200 or 206 (`Range: bytes=N-[M]`) with `ETag`; maybe cut by fault injection.
    fn serve_bytes(&self, req: &Request, data: &[u8], etag: &str) -> Response {
        let total = data.len() as u64;
        let mut r = match req.header("range") {
            Some(range) => {
                let spec = range.strip_prefix("bytes=").and_then(|s| {
                    let (a, b) = s.split_once('-')?;
                    let a: u64 = a.parse().ok()?;
                    let b: u64 = if b.is_empty() { total.saturating_sub(1) } else { b.parse().ok()? };
                    Some((a, b.min(total.saturating_sub(1))))
                });
                match spec {
                    Some((a, b)) if a < total && a <= b => {
                        let mut r = Response::new(206).h("content-range", format!("bytes {a}-{b}/{total}"));
                        r.body = data[a as usize..=b as usize].to_vec();
                        r
                    }
                    _ => return Response::new(416).h("content-range", format!("bytes */{total}")),
                }
            }
            None => {
                let mut r = Response::new(200);
                r.body = data.to_vec();
                r
            }
        };
        if req.method == "GET"
            && r.body.len() > 1
            && self.truncate.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
        {
            r.cut = Some(r.body.len() / 2);
        }
        r.h("etag", format!("\"{etag}\"")).h("accept-ranges", "bytes")
    }
}
