//! Chat templates (minijinja with transformers' semantics) and the text side of the
//! processor: rendering, `<image>` expansion, tokenization with char offsets and the
//! assistant-token mask.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, Error as JError, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{BadRowKind, DataError, Result};
use crate::image_proc::read_json;

/// One content block of a message: `{"index", "text", "type"}` as in
/// llava-instruct-mix-vsft (`type` is `"text"` or `"image"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Content {
    pub index: Option<i64>,
    pub text: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
}

impl Content {
    pub fn text(t: impl Into<String>) -> Self {
        Content { index: None, text: Some(t.into()), kind: "text".into() }
    }
    pub fn image(index: usize) -> Self {
        Content { index: Some(index as i64), text: None, kind: "image".into() }
    }
    pub fn is_image(&self) -> bool {
        self.kind == "image"
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Vec<Content>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: Vec<Content>) -> Self {
        Message { role: role.into(), content }
    }
}

/// Roles accepted in datasets.
pub const KNOWN_ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// Special-token strings handed to the template (`bos_token`, `eos_token`, ...), as
/// transformers passes `tokenizer.special_tokens_map`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

impl SpecialTokens {
    /// From `tokenizer_config.json` (values may be strings or AddedToken dicts with `content`).
    pub fn from_tokenizer_config(v: &serde_json::Value) -> Self {
        let get = |k: &str| -> Option<String> {
            match v.get(k)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
                _ => None,
            }
        };
        SpecialTokens {
            bos_token: get("bos_token"),
            eos_token: get("eos_token"),
            unk_token: get("unk_token"),
            pad_token: get("pad_token"),
        }
    }
}

const GEN_START: char = '\u{F0001}';
const GEN_END: char = '\u{F0002}';

/// A rendered conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    /// Char (code point) spans of `{% generation %}` blocks, as transformers' `generation_indices`.
    pub generation_spans: Vec<(usize, usize)>,
}

/// Largest chat template accepted (real ones are a few KiB; Llama-3.x's is 7 KiB).
pub const MAX_TEMPLATE_BYTES: u64 = 1 << 20;
/// Largest `tokenizer.json` read (Qwen2's, with 151k tokens and their merges, is 7 MiB;
/// Gemma's 33 MiB).
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;
/// Largest `tokenizer_config.json` / `chat_template.json` read (these hold the template and
/// the added tokens: a few hundred KiB at most in practice).
pub const MAX_TOKENIZER_CONFIG_BYTES: u64 = 64 << 20;
/// Work one render may do, in minijinja fuel: about one unit per instruction and per 64
/// bytes of data created, so it bounds both time and memory (~256 MiB). The fixture
/// templates use under 4,000 for the fixture conversations (see the robustness tests), and
/// text up to `MAX_RENDERED_BYTES` costs well under a tenth of this: a template that runs out
/// is in a runaway loop or doubles strings.
pub const TEMPLATE_FUEL: u64 = 4_000_000;
/// Largest rendered conversation (before tokenization).
pub const MAX_RENDERED_BYTES: usize = 16 << 20;
/// Deepest nesting of macro calls / includes (minijinja's default is 500; each level costs a
/// few KiB of stack, and workers run on threads with `loader::WORKER_STACK_BYTES`).
pub const TEMPLATE_RECURSION_LIMIT: usize = 200;
/// Largest `indent` of the `tojson` filter.
const MAX_TOJSON_INDENT: usize = 64;

/// A compiled chat template.
pub struct ChatTemplate {
    source: String,
    /// Where the template came from (a file path, or "inline" when given as text): named
    /// in render errors.
    origin: String,
    env: Environment<'static>,
    has_generation: bool,
}

/// Output of a render, refused past `MAX_RENDERED_BYTES`.
struct CappedOutput {
    buf: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > MAX_RENDERED_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered text too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("has_generation", &self.has_generation).finish()
    }
}

/// Replaces `{% generation %}` / `{% endgeneration %}` (with any whitespace-control dashes)
/// by a filter block, so that trim_blocks / lstrip_blocks act on them exactly as on the
/// original block tags and the body comes out wrapped in sentinels.
fn rewrite_generation_tags(src: &str) -> (String, bool) {
    let mut out = String::with_capacity(src.len() + 32);
    let mut rest = src;
    let mut found = false;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos + 2..];
        let Some(end) = tail.find("%}") else {
            out.push_str(&rest[pos..]);
            rest = "";
            break;
        };
        let inner = &tail[..end];
        let (lead_dash, body) = match inner.strip_prefix('-') {
            Some(b) => ("-", b),
            None => match inner.strip_prefix('+') {
                Some(b) => ("+", b),
                None => ("", inner),
            },
        };
        let (trail_dash, body) = match body.strip_suffix('-') {
            Some(b) => ("-", b),
            None => match body.strip_suffix('+') {
                Some(b) => ("+", b),
                None => ("", body),
            },
        };
        match body.trim() {
            "generation" => {
                found = true;
                out.push_str(&format!("{{%{lead_dash} filter __vsft_generation {trail_dash}%}}"));
            }
            "endgeneration" => out.push_str(&format!("{{%{lead_dash} endfilter {trail_dash}%}}")),
            _ => {
                out.push_str("{%");
                out.push_str(inner);
                out.push_str("%}");
            }
        }
        rest = &tail[end + 2..];
    }
    out.push_str(rest);
    (out, found)
}

/// Python's `json.dumps` as transformers' `tojson` filter calls it (no HTML escaping).
fn py_json(v: &Value, indent: Option<usize>, sort_keys: bool, ensure_ascii: bool, seps: (&str, &str), depth: usize, out: &mut String) -> std::result::Result<(), JError> {
    use minijinja::value::ValueKind as K;
    let nl = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    match v.kind() {
        K::Undefined | K::None => out.push_str("null"),
        K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        K::Number => {
            if let Some(i) = v.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f: f64 = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                if f.is_finite() {
                    let s = format!("{f:?}");
                    out.push_str(&s);
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else if f > 0.0 {
                    out.push_str("Infinity");
                } else {
                    out.push_str("-Infinity");
                }
            }
        }
        K::String => {
            let s = v.as_str().unwrap_or_default();
            out.push('"');
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    '\u{8}' => out.push_str("\\b"),
                    '\u{c}' => out.push_str("\\f"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c if ensure_ascii && (c as u32) > 0x7e => {
                        let mut buf = [0u16; 2];
                        for u in c.encode_utf16(&mut buf) {
                            out.push_str(&format!("\\u{:04x}", u));
                        }
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        K::Seq | K::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            if items.is_empty() {
                out.push(']');
                return Ok(());
            }
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(seps.0);
                }
                nl(out, depth + 1);
                py_json(it, indent, sort_keys, ensure_ascii, seps, depth + 1, out)?;
            }
            nl(out, depth);
            out.push(']');
        }
        K::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if sort_keys {
                keys.sort();
            }
            out.push('{');
            if keys.is_empty() {
                out.push('}');
                return Ok(());
            }
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(seps.0);
                }
                nl(out, depth + 1);
                let ks = if k.as_str().is_some() { k.clone() } else { Value::from(k.to_string()) };
                py_json(&ks, indent, sort_keys, ensure_ascii, seps, depth + 1, out)?;
                out.push_str(seps.1);
                py_json(&v.get_item(k)?, indent, sort_keys, ensure_ascii, seps, depth + 1, out)?;
            }
            nl(out, depth);
            out.push('}');
        }
        _ => {
            py_json(&Value::from(v.to_string()), indent, sort_keys, ensure_ascii, seps, depth, out)?;
        }
    }
    Ok(())
}

fn tojson_filter(v: Value, kwargs: Kwargs) -> std::result::Result<Value, JError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    if let Some(n) = indent.filter(|&n| n > MAX_TOJSON_INDENT) {
        return Err(JError::new(ErrorKind::InvalidOperation, format!("tojson: indent {n} is larger than the {MAX_TOJSON_INDENT} allowed")));
    }
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let default = if indent.is_some() { (",".to_string(), ": ".to_string()) } else { (", ".to_string(), ": ".to_string()) };
    let seps = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(JError::new(ErrorKind::InvalidOperation, "tojson: separators must have 2 items")),
        None => default,
    };
    let mut out = String::new();
    py_json(&v, indent, sort_keys.unwrap_or(false), ensure_ascii.unwrap_or(false), (&seps.0, &seps.1), 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// `strftime_now(fmt)`: the UTC time, formatted with the common `strftime` codes.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let days = secs.div_euclid(86400);
    let sod = secs.rem_euclid(86400);
    // civil_from_days (H. Hinnant)
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    let wd = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    const MON: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAY: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&MON[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MON[(m - 1) as usize]),
            Some('a') => out.push_str(&DAY[wd][..3]),
            Some('A') => out.push_str(DAY[wd]),
            Some('H') => out.push_str(&format!("{:02}", sod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", sod % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", sod % 60)),
            Some('j') => out.push_str(&format!("{:03}", doy + 1)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

impl ChatTemplate {
    /// Compiles a template given as text (errors say "chat template: inline: ..."; see
    /// `from_file_source` for one read from a file).
    pub fn new(source: &str) -> Result<Self> {
        Self::compile(source, "inline".to_string())
    }

    /// Compiles a template read from `origin`; errors name that file.
    pub fn from_file_source(source: &str, origin: &Path) -> Result<Self> {
        Self::compile(source, origin.display().to_string())
    }

    fn compile(source: &str, origin: String) -> Result<Self> {
        if source.len() as u64 > MAX_TEMPLATE_BYTES {
            return Err(DataError::Template(format!(
                "{origin}: the template has {} bytes; at most {} are allowed",
                source.len(),
                crate::guard::human_bytes(MAX_TEMPLATE_BYTES)
            )));
        }
        let (rewritten, has_generation) = rewrite_generation_tags(source);
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .keep_trailing_newline(false)
                .build()
                .map_err(|e| DataError::Template(format!("{origin}: {e}")))?,
        );
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, JError> {
            Err(JError::new(ErrorKind::InvalidOperation, format!("raise_exception: {msg}")))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson_filter);
        env.add_filter("__vsft_generation", |s: String| -> String {
            let mut o = String::with_capacity(s.len() + 8);
            o.push(GEN_START);
            o.push_str(&s);
            o.push(GEN_END);
            o
        });
        env.add_template_owned("chat", rewritten).map_err(|e| DataError::Template(format!("{origin}: {}", template_error_text(&e))))?;
        Ok(ChatTemplate { source: source.to_string(), origin, env, has_generation })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from: its file, or "inline".
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The fuel (of `TEMPLATE_FUEL`) that rendering `messages` consumes: how the budget was sized.
    pub fn fuel_used(&self, messages: &[Message], add_generation_prompt: bool, special: &SpecialTokens) -> Result<u64> {
        Ok(self.render_raw(messages, add_generation_prompt, special)?.1)
    }

    /// Renders with transformers' variables within `TEMPLATE_FUEL` and `MAX_RENDERED_BYTES`,
    /// `{% generation %}` sentinels still in. Returns the output and the fuel consumed.
    fn render_raw(&self, messages: &[Message], add_generation_prompt: bool, special: &SpecialTokens) -> Result<(String, u64)> {
        let fail = |msg: String| DataError::Template(format!("{}: {msg}", self.origin));
        let tmpl = self.env.get_template("chat").map_err(|e| fail(template_error_text(&e)))?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from(Serde(messages)));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        for (k, v) in [
            ("bos_token", &special.bos_token),
            ("eos_token", &special.eos_token),
            ("unk_token", &special.unk_token),
            ("pad_token", &special.pad_token),
        ] {
            if let Some(v) = v {
                ctx.insert(k, Value::from(v.as_str()));
            }
        }
        let mut out = CappedOutput { buf: Vec::new(), overflowed: false };
        let rendered = tmpl.render_captured_to(Value::from(Serde(ctx)), &mut out);
        let captured = match rendered {
            Ok(c) => c,
            Err(_) if out.overflowed => {
                return Err(fail(format!(
                    "the rendered text is larger than the {} allowed",
                    crate::guard::human_bytes(MAX_RENDERED_BYTES as u64)
                )))
            }
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {
                return Err(fail(format!(
                    "rendering did more work than the {TEMPLATE_FUEL} steps allowed (a loop that does not end, \
                     or text that grows without bound){}",
                    template_location(&e)
                )))
            }
            Err(e) => return Err(fail(template_error_text(&e))),
        };
        let used = captured.state().fuel_levels().map(|(consumed, _)| consumed).unwrap_or(0);
        drop(captured);
        // The template writes `str`s only, so the bytes are UTF-8 (a cut can only come from
        // the cap above, which fails the render).
        let text = String::from_utf8(out.buf).map_err(|_| fail("the rendered text is not UTF-8".into()))?;
        Ok((text, used))
    }

    /// Whether the template has `{% generation %}` blocks.
    pub fn has_generation(&self) -> bool {
        self.has_generation
    }

    /// Renders `messages` with transformers' variables. Message keys whose value is None are
    /// dropped (as transformers' `_normalize_chat_messages` does); content blocks keep them.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool, special: &SpecialTokens) -> Result<Rendered> {
        let (raw, _) = self.render_raw(messages, add_generation_prompt, special)?;
        if !raw.contains(GEN_START) {
            return Ok(Rendered { text: raw, generation_spans: vec![] });
        }
        let mut text = String::with_capacity(raw.len());
        let mut spans = Vec::new();
        let mut nchars = 0usize;
        let mut stack = Vec::new();
        for c in raw.chars() {
            match c {
                GEN_START => stack.push(nchars),
                GEN_END => {
                    if let Some(s) = stack.pop() {
                        if stack.is_empty() {
                            spans.push((s, nchars));
                        }
                    }
                }
                c => {
                    text.push(c);
                    nchars += 1;
                }
            }
        }
        // Python appends the span when the block closes; nested blocks are not meaningful.
        spans.sort();
        Ok(Rendered { text, generation_spans: spans })
    }
}

/// A minijinja error as one line: what went wrong and where (`line N`), then its causes.
fn template_error_text(e: &JError) -> String {
    let mut msg = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    msg.push_str(&template_location(e));
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

/// ` (line N)` of a template error, when known.
fn template_location(e: &JError) -> String {
    e.line().map(|l| format!(" (line {l})")).unwrap_or_default()
}

/// Where a chat template comes from, in transformers' order of preference.
pub fn load_chat_template(model_dir: &Path, explicit: Option<&Path>) -> Result<(String, PathBuf)> {
    use crate::guard::{read_json_capped, read_text_capped};
    if let Some(p) = explicit {
        // A .json file holding {"chat_template": ...} is accepted too.
        if p.extension().is_some_and(|e| e == "json") {
            let v = read_json_capped(p, MAX_TOKENIZER_CONFIG_BYTES, "chat template JSON")?;
            if let Some(t) = v.get("chat_template").and_then(|t| t.as_str()) {
                return Ok((t.to_string(), p.to_path_buf()));
            }
            return Err(DataError::Config { path: p.to_path_buf(), msg: "no `chat_template` string in this JSON file".into() });
        }
        return Ok((read_text_capped(p, MAX_TEMPLATE_BYTES, "chat template")?, p.to_path_buf()));
    }
    let jinja = model_dir.join("chat_template.jinja");
    if jinja.exists() {
        return Ok((read_text_capped(&jinja, MAX_TEMPLATE_BYTES, "chat template")?, jinja));
    }
    for f in ["chat_template.json", "tokenizer_config.json", "processor_config.json"] {
        let p = model_dir.join(f);
        if p.exists() {
            let v = read_json_capped(&p, MAX_TOKENIZER_CONFIG_BYTES, f)?;
            match v.get("chat_template") {
                Some(serde_json::Value::String(s)) => return Ok((s.clone(), p)),
                Some(serde_json::Value::Array(list)) => {
                    // [{"name": "default", "template": ...}, ...]
                    for e in list {
                        if e.get("name").and_then(|n| n.as_str()) == Some("default") {
                            if let Some(t) = e.get("template").and_then(|t| t.as_str()) {
                                return Ok((t.to_string(), p));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Err(DataError::Config {
        path: model_dir.to_path_buf(),
        msg: "no chat template: pass one, or provide chat_template.jinja, chat_template.json or tokenizer_config.json's chat_template".into(),
    })
}

/// How `<image>` is expanded, from `processor_config.json` / `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTokenSpec {
    pub image_token: String,
    /// Number of tokens each `<image>` becomes (1 = no expansion, the legacy behaviour).
    /// Not used when `dynamic`.
    pub image_seq_length: usize,
    /// The count depends on each image's size (LLaVA-NeXT): only the per-image encoders
    /// (`encode_images`, `Processor::process_row`, `Processor::encode_prompt_with_images`)
    /// can expand `<image>`; the count-based ones (`encode`, `encode_prompt`) refuse.
    pub dynamic: bool,
}

impl ImageTokenSpec {
    pub fn from_model_dir(dir: &Path, crop_hw: Option<(usize, usize)>) -> Result<Self> {
        let mut image_token = "<image>".to_string();
        let mut seq: Option<usize> = None;
        let pc = dir.join("processor_config.json");
        let mut patch: Option<usize> = None;
        let mut patch_source = pc.clone();
        let mut extra = 0usize;
        let mut strategy = String::new();
        if pc.exists() {
            let v = read_json(&pc)?;
            if let Some(t) = v.get("image_token").and_then(|t| t.as_str()) {
                image_token = t.to_string();
            }
            seq = v.get("image_seq_length").and_then(|x| x.as_u64()).map(|x| x as usize);
            patch = v.get("patch_size").and_then(|x| x.as_u64()).map(|x| x as usize);
            extra = v.get("num_additional_image_tokens").and_then(|x| x.as_u64()).unwrap_or(0) as usize;
            strategy = v.get("vision_feature_select_strategy").and_then(|x| x.as_str()).unwrap_or("").to_string();
        }
        if seq.is_none() && patch.is_none() {
            // No processor_config.json: the model's config.json (LLaVA: image_seq_length, or
            // the vision tower's patch size with the CLS token dropped by the "default" strategy).
            let cfg = dir.join("config.json");
            if cfg.exists() {
                let v = read_json(&cfg)?;
                seq = v.get("image_seq_length").and_then(|x| x.as_u64()).map(|x| x as usize);
                if seq.is_none() {
                    patch = v.pointer("/vision_config/patch_size").and_then(|x| x.as_u64()).map(|x| x as usize);
                    patch_source = cfg.clone();
                    if patch.is_some() {
                        extra = 1; // CLIP's CLS token
                        strategy = v.get("vision_feature_select_strategy").and_then(|x| x.as_str()).unwrap_or("default").to_string();
                    }
                }
            }
        }
        let image_seq_length = match (seq, patch) {
            (Some(s), _) => s,
            (None, Some(p)) => {
                let (h, w) = crop_hw.ok_or_else(|| DataError::Config {
                    path: pc.clone(),
                    msg: "patch_size given but the image processor has no fixed output size".into(),
                })?;
                // A patch size of 0, or one larger than the image, gives no tokens: refused, not divided by.
                let patches = h.checked_div(p).unwrap_or(0) * w.checked_div(p).unwrap_or(0);
                let n = (patches + extra).checked_sub(usize::from(strategy == "default")).filter(|&n| n > 0);
                n.ok_or_else(|| DataError::Config {
                    path: patch_source,
                    msg: format!("`patch_size` must be a positive integer at most the image's {h}×{w}, found {p}"),
                })?
            }
            (None, None) => 1,
        };
        Ok(ImageTokenSpec { image_token, image_seq_length, dynamic: false })
    }
}

/// The tokenized form of one example.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The rendered text (before `<image>` expansion).
    pub text: String,
    pub input_ids: Vec<u32>,
    /// Whether each token belongs to an assistant turn (from generation spans or prefixes);
    /// `None` when not requested.
    pub assistant_mask: Option<Vec<bool>>,
    /// Positions (token index ranges) of each image's tokens.
    pub image_spans: Vec<(usize, usize)>,
    /// Each image's tokens with the vision wrappers around them when the family has them
    /// (Qwen: `<|vision_start|>` … `<|vision_end|>`); equal to `image_spans` otherwise.
    pub vision_spans: Vec<(usize, usize)>,
    pub n_images: usize,
}

/// How assistant tokens are located for the `assistant` label mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssistantSpans {
    /// `{% generation %}` blocks, or message prefixes when the template has none.
    Auto,
    Generation,
    Prefix,
}

/// Tokenizer + chat template + image-token expansion: the text half of `LlavaProcessor`.
pub struct TextProcessor {
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub template: ChatTemplate,
    pub special: SpecialTokens,
    pub image: ImageTokenSpec,
    pub image_token_id: u32,
    pub pad_token_id: u32,
    pub bos_token_id: Option<u32>,
    /// Token ids written before and after each image's tokens (Qwen: `<|vision_start|>`,
    /// `<|vision_end|>`), masked with them by the `pad+image` label mask.
    pub vision_wrappers: Option<(u32, u32)>,
}

impl std::fmt::Debug for TextProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextProcessor")
            .field("special", &self.special)
            .field("image", &self.image)
            .field("image_token_id", &self.image_token_id)
            .field("pad_token_id", &self.pad_token_id)
            .field("vision_wrappers", &self.vision_wrappers)
            .finish()
    }
}

/// Loads a `tokenizer.json` of at most `MAX_TOKENIZER_BYTES`; a file the `tokenizers` crate
/// cannot use (including one that makes it panic) is an error naming the file.
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let bytes = crate::guard::read_capped(path, MAX_TOKENIZER_BYTES, "tokenizer.json")?;
    let terr = |msg: String| DataError::Tokenizer { path: path.to_path_buf(), msg };
    crate::guard::catch_panic(|| tokenizers::Tokenizer::from_bytes(&bytes))
        .map_err(|p| terr(format!("the tokenizers library failed on this file: {p}")))?
        .map_err(|e| terr(e.to_string()))
}

impl TextProcessor {
    /// Loads `tokenizer.json`, `tokenizer_config.json`, the chat template and the image-token
    /// settings from a model directory. `crop_hw` is the image processor's output size.
    pub fn from_model_dir(dir: &Path, chat_template: Option<&Path>, crop_hw: Option<(usize, usize)>) -> Result<Self> {
        let image = ImageTokenSpec::from_model_dir(dir, crop_hw)?;
        Self::from_model_dir_with_spec(dir, chat_template, image)
    }

    /// `from_model_dir` with the image-token settings given (the family knows them).
    pub fn from_model_dir_with_spec(dir: &Path, chat_template: Option<&Path>, image: ImageTokenSpec) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = load_tokenizer(&tok_path)?;
        let tc_path = dir.join("tokenizer_config.json");
        let special = if tc_path.exists() {
            SpecialTokens::from_tokenizer_config(&crate::guard::read_json_capped(&tc_path, MAX_TOKENIZER_CONFIG_BYTES, "tokenizer_config.json")?)
        } else {
            SpecialTokens::default()
        };
        let (src, src_path) = load_chat_template(dir, chat_template)?;
        let template = ChatTemplate::from_file_source(&src, &src_path)?;
        Self::new(tokenizer, template, special, image, &tok_path)
    }

    pub fn new(tokenizer: tokenizers::Tokenizer, template: ChatTemplate, special: SpecialTokens, image: ImageTokenSpec, tok_path: &Path) -> Result<Self> {
        let image_token_id = tokenizer.token_to_id(&image.image_token).ok_or_else(|| DataError::Tokenizer {
            path: tok_path.to_path_buf(),
            msg: format!("image token {:?} is not in the vocabulary", image.image_token),
        })?;
        let pad = special.pad_token.clone().ok_or_else(|| DataError::Tokenizer {
            path: tok_path.to_path_buf(),
            msg: "no pad_token in tokenizer_config.json".into(),
        })?;
        let pad_token_id = tokenizer
            .token_to_id(&pad)
            .ok_or_else(|| DataError::Tokenizer { path: tok_path.to_path_buf(), msg: format!("pad token {pad:?} not in vocabulary") })?;
        let bos_token_id = special.bos_token.as_deref().and_then(|b| tokenizer.token_to_id(b));
        Ok(TextProcessor { tokenizer: Arc::new(tokenizer), template, special, image, image_token_id, pad_token_id, bos_token_id, vision_wrappers: None })
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Rendered> {
        self.template.render(messages, add_generation_prompt, &self.special)
    }

    /// Assistant spans by rendering prefixes: for each assistant message `i`, the text between
    /// render(messages[..i], add_generation_prompt=true) and render(messages[..=i]).
    pub fn prefix_spans(&self, messages: &[Message], full: &str) -> Result<Vec<(usize, usize)>> {
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?.text;
            let upto = self.render(&messages[..=i], false)?.text;
            if !upto.starts_with(&before) || !full.starts_with(&upto) {
                return Err(DataError::Template(format!(
                    "the chat template is not prefix-stable at message {i}; the `assistant` label mask needs {{% generation %}} blocks in it"
                )));
            }
            spans.push((before.chars().count(), upto.chars().count()));
        }
        Ok(spans)
    }

    /// Renders, checks the image count, tokenizes and expands `<image>` as `LlavaProcessor`
    /// does. `add_special_tokens` is switched off when the rendered text already starts with
    /// the BOS token (as `processor.apply_chat_template(tokenize=True)` does).
    pub fn encode(&self, messages: &[Message], n_images: usize, add_special_tokens: bool, assistant: Option<AssistantSpans>) -> Result<Encoded> {
        self.encode_with(messages, n_images, add_special_tokens, false, assistant)
    }

    /// Prompt ids for generation: the template with `add_generation_prompt=true`, `<image>`
    /// expanded, BOS as the tokenizer adds it unless the template already did. Fixed-count
    /// families only (see `Processor::encode_prompt_with_images` for any family).
    pub fn encode_prompt(&self, messages: &[Message], n_images: usize) -> Result<Vec<u32>> {
        Ok(self.encode_with(messages, n_images, true, true, None)?.input_ids)
    }

    /// `encode` with the generation prompt as an option (fixed-count families: every image
    /// becomes `image_seq_length` tokens).
    pub fn encode_with(
        &self,
        messages: &[Message],
        n_images: usize,
        add_special_tokens: bool,
        add_generation_prompt: bool,
        assistant: Option<AssistantSpans>,
    ) -> Result<Encoded> {
        if self.image.dynamic && n_images > 0 {
            return Err(DataError::Other(format!(
                "this processor's {} token count depends on each image's size: encode with the images (Processor::process_row / encode_prompt_with_images)",
                self.image.image_token
            )));
        }
        let counts = vec![self.image.image_seq_length; n_images];
        self.encode_images(messages, &counts, add_special_tokens, add_generation_prompt, assistant)
    }

    /// Renders, checks the image count, tokenizes and expands the k-th `<image>` into
    /// `image_tokens[k]` image tokens, as the `Llava*Processor`s do.
    pub fn encode_images(
        &self,
        messages: &[Message],
        image_tokens: &[usize],
        add_special_tokens: bool,
        add_generation_prompt: bool,
        assistant: Option<AssistantSpans>,
    ) -> Result<Encoded> {
        let n_images = image_tokens.len();
        let rendered = self.render(messages, add_generation_prompt)?;
        let text = rendered.text;
        let n_in_text = text.matches(self.image.image_token.as_str()).count();
        if n_in_text != n_images {
            return Err(DataError::Other(format!(
                "{n_in_text} {} tokens in the rendered text but {n_images} images",
                self.image.image_token
            )));
        }
        let mut add_special = add_special_tokens;
        if let Some(b) = &self.special.bos_token {
            if text.starts_with(b.as_str()) {
                add_special = false;
            }
        }
        let spans = match assistant {
            None => None,
            Some(AssistantSpans::Generation) => Some(rendered.generation_spans),
            Some(AssistantSpans::Auto) if self.template.has_generation() => Some(rendered.generation_spans),
            Some(_) => Some(self.prefix_spans(messages, &text)?),
        };
        // Tokenize with each <image> once; added special tokens are split out before
        // normalisation, so expanding ids afterwards equals tokenizing the expanded text.
        let enc = crate::guard::catch_panic(|| self.tokenizer.encode_char_offsets(text.as_str(), add_special))
            .map_err(|p| DataError::Other(format!("tokenizer: the tokenizers library failed on this text: {p}")))?
            .map_err(|e| DataError::Other(format!("tokenizer: {e}")))?;
        let ids = enc.get_ids();
        let offsets = enc.get_offsets();
        let n_img_in_ids = ids.iter().filter(|&&t| t == self.image_token_id).count();
        if n_img_in_ids != n_images {
            return Err(DataError::Other(format!(
                "{n_img_in_ids} image tokens after tokenization but {n_images} images (is {} a special token?)",
                self.image.image_token
            )));
        }
        let total = ids.len() + image_tokens.iter().sum::<usize>() - n_images.min(ids.len());
        let mut input_ids = Vec::with_capacity(total);
        let mut mask = spans.as_ref().map(|_| Vec::with_capacity(total));
        let mut image_spans = Vec::with_capacity(n_images);
        for (k, &id) in ids.iter().enumerate() {
            let m = spans.as_ref().map(|sp| {
                let (ts, te) = offsets[k];
                sp.iter().any(|&(s, e)| ts < e && te > s)
            });
            if id == self.image_token_id {
                let n_img_tok = image_tokens[image_spans.len()];
                image_spans.push((input_ids.len(), input_ids.len() + n_img_tok));
                for _ in 0..n_img_tok {
                    input_ids.push(id);
                    if let (Some(v), Some(m)) = (mask.as_mut(), m) {
                        v.push(m);
                    }
                }
            } else {
                input_ids.push(id);
                if let (Some(v), Some(m)) = (mask.as_mut(), m) {
                    v.push(m);
                }
            }
        }
        let vision_spans = image_spans
            .iter()
            .map(|&(s, e)| match self.vision_wrappers {
                Some((vs, ve)) => {
                    let s = if s > 0 && input_ids[s - 1] == vs { s - 1 } else { s };
                    let e = if e < input_ids.len() && input_ids[e] == ve { e + 1 } else { e };
                    (s, e)
                }
                None => (s, e),
            })
            .collect();
        Ok(Encoded { text, input_ids, assistant_mask: mask, image_spans, vision_spans, n_images })
    }

    /// `encode_images` (no generation prompt) with errors that carry the row location.
    pub fn encode_row(&self, messages: &[Message], image_tokens: &[usize], add_special_tokens: bool, assistant: Option<AssistantSpans>, file: &Path, row: usize) -> Result<Encoded> {
        self.encode_images(messages, image_tokens, add_special_tokens, false, assistant).map_err(|e| {
            let kind = match &e {
                DataError::Other(m) if m.contains("images") => BadRowKind::ImageCountMismatch,
                _ => BadRowKind::Template,
            };
            let field = if kind == BadRowKind::ImageCountMismatch { "messages/images" } else { "messages" };
            DataError::bad_row(file, row, field, kind, e.to_string())
        })
    }
}
