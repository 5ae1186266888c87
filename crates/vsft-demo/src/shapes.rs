//! The synthetic "shapes" dataset: scenes, drawing, captions, questions, and the splits.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use crate::error::{DemoError, Result};
use crate::parquet_io::{write_rows, ConvRow};
use crate::rng::SplitMix64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Colour {
    pub const ALL: [Colour; 6] = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow, Colour::Purple, Colour::Orange];
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
        }
    }
    /// "a" or "an", as the colour's name needs.
    pub fn article(self) -> &'static str {
        if self == Colour::Orange {
            "an"
        } else {
            "a"
        }
    }
    /// The nominal RGB; pictures vary it by a few levels.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [215, 35, 35],
            Colour::Green => [35, 165, 60],
            Colour::Blue => [35, 70, 215],
            Colour::Yellow => [235, 205, 25],
            Colour::Purple => [135, 50, 175],
            Colour::Orange => [245, 130, 25],
        }
    }
}

/// Where an object sits: pairs are left/right or top/bottom; a lone object is at one of the four.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Place {
    Left,
    Right,
    Top,
    Bottom,
}

impl Place {
    pub const ALL: [Place; 4] = [Place::Left, Place::Right, Place::Top, Place::Bottom];
    pub fn name(self) -> &'static str {
        match self {
            Place::Left => "left",
            Place::Right => "right",
            Place::Top => "top",
            Place::Bottom => "bottom",
        }
    }
    /// "on the left", "at the top", ...
    pub fn phrase(self) -> &'static str {
        match self {
            Place::Left => "on the left",
            Place::Right => "on the right",
            Place::Top => "at the top",
            Place::Bottom => "at the bottom",
        }
    }
    /// Centre as a fraction of the picture's width/height.
    fn centre(self) -> (f32, f32) {
        match self {
            Place::Left => (0.25, 0.5),
            Place::Right => (0.75, 0.5),
            Place::Top => (0.5, 0.25),
            Place::Bottom => (0.5, 0.75),
        }
    }
}

/// One drawn shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub place: Place,
    /// Centre and half-size in pixels.
    pub cx: f32,
    pub cy: f32,
    pub r: f32,
    pub rgb: [u8; 3],
}

const TRIANGLE_SCALE: f32 = 1.05;

/// Object sizes and placement, as fractions of the picture's side. The defaults keep the two
/// objects of a pair apart (tests/dataset.rs checks it) and make each span about 2-3 patches
/// of 14 px at 84 px.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    /// Half-size (circle radius) of objects: uniform in `min_size..=max_size`.
    pub min_size: f32,
    pub max_size: f32,
    /// Centres move by up to this much from their place's nominal centre, in x and in y.
    pub jitter: f32,
    /// Probability of a picture with one object (otherwise two).
    pub p_single: f64,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry { min_size: 0.17, max_size: 0.21, jitter: 0.025, p_single: 0.5 }
    }
}

/// A picture: one or two objects of distinct shapes and distinct colours.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub size: u32,
    pub background: [u8; 3],
    /// Ordered left before right, top before bottom.
    pub objects: Vec<Object>,
}

/// The kinds of questions, each with a fixed phrasing and a one-word answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuestionKind {
    /// "What colour is the circle?" -> "red."
    Colour,
    /// "What colour is the shape on the right?" -> "blue."
    ColourAt,
    /// "Which shape is on the left?" -> "circle."
    Shape,
    /// "Where is the red circle?" -> "left."
    Place,
    /// "How many shapes are there?" -> "two."
    Count,
}

impl QuestionKind {
    pub const ALL: [QuestionKind; 5] = [QuestionKind::Colour, QuestionKind::ColourAt, QuestionKind::Shape, QuestionKind::Place, QuestionKind::Count];
    pub fn name(self) -> &'static str {
        match self {
            QuestionKind::Colour => "colour",
            QuestionKind::ColourAt => "colour-at",
            QuestionKind::Shape => "shape",
            QuestionKind::Place => "place",
            QuestionKind::Count => "count",
        }
    }
    /// The kind of one of this dataset's questions, from its wording.
    pub fn of_question(q: &str) -> Option<QuestionKind> {
        if q.starts_with("What colour is the shape ") {
            Some(QuestionKind::ColourAt)
        } else if q.starts_with("What colour is the ") {
            Some(QuestionKind::Colour)
        } else if q.starts_with("Which shape is ") {
            Some(QuestionKind::Shape)
        } else if q.starts_with("Where is the ") {
            Some(QuestionKind::Place)
        } else if q.starts_with("How many shapes") {
            Some(QuestionKind::Count)
        } else {
            None
        }
    }
}

/// The instructions of stage 1 (captioning); one is drawn per picture.
pub const CAPTION_PROMPTS: [&str; 3] = ["Describe the picture.", "What is in the picture?", "Describe the image briefly."];

const COUNT_WORDS: [&str; 3] = ["zero", "one", "two"];

impl Scene {
    /// A random scene with the default [`Geometry`]: with probability one half a lone object
    /// at one of the four places, otherwise a left/right or top/bottom pair.
    pub fn random(rng: &mut SplitMix64, size: u32) -> Scene {
        Self::random_with(rng, size, &Geometry::default())
    }

    /// A random scene with the given object sizes and jitter.
    pub fn random_with(rng: &mut SplitMix64, size: u32, g: &Geometry) -> Scene {
        let s = size as f32;
        let bg = rng.range(232, 255);
        let background = [0, 1, 2].map(|_| (bg + rng.range(-3, 3)).clamp(0, 255) as u8);
        let places: Vec<Place> = if rng.chance(g.p_single) {
            vec![*rng.pick(&Place::ALL)]
        } else if rng.chance(0.5) {
            vec![Place::Left, Place::Right]
        } else {
            vec![Place::Top, Place::Bottom]
        };
        let shapes = rng.distinct(Shape::ALL.len(), places.len());
        let colours = rng.distinct(Colour::ALL.len(), places.len());
        let jitter = (g.jitter * s).round() as i64;
        let objects = places
            .iter()
            .enumerate()
            .map(|(i, &place)| {
                let (fx, fy) = place.centre();
                let colour = Colour::ALL[colours[i]];
                let rgb = colour.rgb().map(|c| (c as i64 + rng.range(-10, 10)).clamp(0, 255) as u8);
                let r = s * (g.min_size + (g.max_size - g.min_size) * rng.below(1001) as f32 / 1000.0);
                // Jittered, but kept inside the picture (the triangle reaches 1.05 r up).
                let m = (TRIANGLE_SCALE * r + 1.0).min(s / 2.0);
                let cx = (fx * s + rng.range(-jitter, jitter) as f32).clamp(m, s - m);
                let cy = (fy * s + rng.range(-jitter, jitter) as f32).clamp(m, s - m);
                Object { shape: Shape::ALL[shapes[i]], colour, place, cx, cy, r, rgb }
            })
            .collect();
        Scene { size, background, objects }
    }

    /// Whether object `o` covers point `(x, y)` (pixel centres are at `i + 0.5`).
    pub fn covers(o: &Object, x: f32, y: f32) -> bool {
        let (dx, dy) = (x - o.cx, y - o.cy);
        match o.shape {
            Shape::Circle => dx * dx + dy * dy <= o.r * o.r,
            Shape::Square => dx.abs() <= 0.87 * o.r && dy.abs() <= 0.87 * o.r,
            Shape::Triangle => {
                // Apex up, base at the bottom; a little larger so the areas are closer.
                let r = TRIANGLE_SCALE * o.r;
                let t = (dy + r) / (2.0 * r); // 0 at the apex, 1 at the base
                (0.0..=1.0).contains(&t) && dx.abs() <= t * r
            }
        }
    }

    /// RGB pixels, row-major, with 2×2 supersampling at the edges.
    pub fn render(&self) -> Vec<u8> {
        let n = self.size as usize;
        let mut px = Vec::with_capacity(n * n * 3);
        for y in 0..n {
            for x in 0..n {
                let mut acc = [0u32; 3];
                for (sx, sy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                    let (fx, fy) = (x as f32 + sx, y as f32 + sy);
                    let c = self.objects.iter().rev().find(|o| Self::covers(o, fx, fy)).map(|o| o.rgb).unwrap_or(self.background);
                    for (a, v) in acc.iter_mut().zip(c) {
                        *a += v as u32;
                    }
                }
                px.extend(acc.map(|a| ((a + 2) / 4) as u8));
            }
        }
        px
    }

    /// The picture as PNG bytes.
    pub fn png(&self) -> Result<Vec<u8>> {
        let img = image::RgbImage::from_raw(self.size, self.size, self.render()).ok_or_else(|| DemoError::Image("buffer size".into()))?;
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).map_err(|e| DemoError::Image(e.to_string()))?;
        Ok(out)
    }

    /// "a red circle on the left and a blue square on the right."
    pub fn caption(&self) -> String {
        let parts: Vec<String> = self.objects.iter().map(|o| format!("{} {} {} {}", o.colour.article(), o.colour.name(), o.shape.name(), o.place.phrase())).collect();
        format!("{}.", parts.join(" and "))
    }

    /// Every question this scene answers unambiguously, with its answer.
    pub fn questions(&self) -> Vec<(QuestionKind, String, String)> {
        let mut q = Vec::new();
        for o in &self.objects {
            let (c, s, p) = (o.colour.name(), o.shape.name(), o.place);
            q.push((QuestionKind::Colour, format!("What colour is the {s}?"), format!("{c}.")));
            q.push((QuestionKind::ColourAt, format!("What colour is the shape {}?", p.phrase()), format!("{c}.")));
            q.push((QuestionKind::Shape, format!("Which shape is {}?", p.phrase()), format!("{s}.")));
            q.push((QuestionKind::Place, format!("Where is the {c} {s}?"), format!("{}.", p.name())));
        }
        q.push((QuestionKind::Count, "How many shapes are there?".into(), format!("{}.", COUNT_WORDS[self.objects.len()])));
        q
    }

    /// Up to `k` distinct questions of the given kinds, drawing the kind uniformly first so
    /// kinds are balanced.
    fn draw_questions(&self, rng: &mut SplitMix64, k: usize, kinds: &[QuestionKind]) -> Vec<(QuestionKind, String, String)> {
        let mut pool: Vec<_> = self.questions().into_iter().filter(|q| kinds.contains(&q.0)).collect();
        let mut out = Vec::new();
        while out.len() < k && !pool.is_empty() {
            let mut kinds: Vec<QuestionKind> = pool.iter().map(|x| x.0).collect();
            kinds.sort();
            kinds.dedup();
            let kind = *rng.pick(&kinds);
            let idx: Vec<usize> = (0..pool.len()).filter(|&i| pool[i].0 == kind).collect();
            out.push(pool.remove(*rng.pick(&idx)));
        }
        out
    }
}

/// What to generate. Each split has its own random stream (derived from `seed`), so
/// changing one split's size leaves the other splits unchanged.
///
/// The default sizes suit the demo recipe: 1 epoch of captions, then 20 epochs of the 3000
/// Q&A rows at batch 16 (3760 steps). Questions about a lone object are learnt within a few
/// epochs; those that pick one object of a pair only after 10 to 20 (README: "The demo").
#[derive(Debug, Clone, PartialEq)]
pub struct ShapesSpec {
    pub seed: u64,
    /// Width = height of the pictures in pixels.
    pub image_size: u32,
    pub n_captions: usize,
    pub n_qa_train: usize,
    pub n_qa_test: usize,
    /// Question/answer turns per training conversation: 1 to this many.
    pub max_turns: usize,
    pub row_group_size: usize,
    pub geometry: Geometry,
    /// The kinds of questions asked (train and test), all by default.
    pub kinds: Vec<QuestionKind>,
}

impl Default for ShapesSpec {
    fn default() -> Self {
        ShapesSpec {
            seed: 2024,
            image_size: 84,
            n_captions: 2000,
            n_qa_train: 3000,
            n_qa_test: 200,
            max_turns: 3,
            row_group_size: 500,
            geometry: Geometry::default(),
            kinds: QuestionKind::ALL.to_vec(),
        }
    }
}

impl ShapesSpec {
    /// Checks the values make sense (sizes, fractions, at least one kind and turn).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let g = &self.geometry;
        if self.image_size < 16 {
            return Err(format!("image_size {} is below 16", self.image_size));
        }
        if !(0.0 < g.min_size && g.min_size <= g.max_size && g.max_size <= 0.25) {
            return Err(format!("need 0 < min_size <= max_size <= 0.25, got {} and {}", g.min_size, g.max_size));
        }
        if !(0.0..=0.2).contains(&g.jitter) || !(0.0..=1.0).contains(&g.p_single) {
            return Err(format!("jitter {} must be in 0..=0.2 and p_single {} in 0..=1", g.jitter, g.p_single));
        }
        if self.kinds.is_empty() || self.max_turns == 0 || self.row_group_size == 0 {
            return Err("kinds, max_turns and row_group_size must not be empty or zero".into());
        }
        Ok(())
    }
}

/// What [`write_shapes_dataset`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoFiles {
    pub root: PathBuf,
    /// `root/captions`: a Hub-layout dataset directory (train split) for stage 1.
    pub captions_dir: PathBuf,
    /// `root/qa`: a Hub-layout dataset directory (train + test splits) for stage 2.
    pub qa_dir: PathBuf,
    pub captions_train: PathBuf,
    pub qa_train: PathBuf,
    pub qa_test: PathBuf,
}

const CAPTIONS_STREAM: u64 = 0x0C4A_7105;
const QA_TRAIN_STREAM: u64 = 0x0A0A_7EA1;
const QA_TEST_STREAM: u64 = 0x0A0A_7E57;

fn stream(seed: u64, id: u64) -> SplitMix64 {
    let mut r = SplitMix64::new(seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.next_u64();
    r
}

pub(crate) fn caption_rows(spec: &ShapesSpec) -> Result<Vec<ConvRow>> {
    let mut rng = stream(spec.seed, CAPTIONS_STREAM);
    (0..spec.n_captions)
        .map(|_| {
            let scene = Scene::random_with(&mut rng, spec.image_size, &spec.geometry);
            let prompt = rng.pick(&CAPTION_PROMPTS).to_string();
            Ok(ConvRow { turns: vec![(prompt, scene.caption())], png: scene.png()? })
        })
        .collect()
}

pub(crate) fn qa_train_rows(spec: &ShapesSpec) -> Result<Vec<ConvRow>> {
    let mut rng = stream(spec.seed, QA_TRAIN_STREAM);
    (0..spec.n_qa_train)
        .map(|_| {
            let scene = Scene::random_with(&mut rng, spec.image_size, &spec.geometry);
            let k = 1 + rng.below(spec.max_turns.max(1));
            let turns = scene.draw_questions(&mut rng, k, &spec.kinds).into_iter().map(|(_, q, a)| (q, a)).collect();
            Ok(ConvRow { turns, png: scene.png()? })
        })
        .collect()
}

/// Test rows: one question each, the kinds in turn (so each kind has an equal share).
pub(crate) fn qa_test_rows(spec: &ShapesSpec) -> Result<Vec<ConvRow>> {
    let mut rng = stream(spec.seed, QA_TEST_STREAM);
    (0..spec.n_qa_test)
        .map(|i| {
            let scene = Scene::random_with(&mut rng, spec.image_size, &spec.geometry);
            let kind = spec.kinds[i % spec.kinds.len()];
            let cands: Vec<_> = scene.questions().into_iter().filter(|x| x.0 == kind).collect();
            let (_, q, a) = cands[rng.below(cands.len())].clone();
            Ok(ConvRow { turns: vec![(q, a)], png: scene.png()? })
        })
        .collect()
}

/// Generates the dataset under `dir` (see the crate docs for the layout). Deterministic:
/// the same spec gives the same bytes.
pub fn write_shapes_dataset(dir: &Path, spec: &ShapesSpec) -> Result<DemoFiles> {
    spec.validate().map_err(|m| DemoError::data(dir, format!("bad ShapesSpec: {m}")))?;
    let captions_dir = dir.join("captions");
    let qa_dir = dir.join("qa");
    let files = DemoFiles {
        root: dir.to_path_buf(),
        captions_train: captions_dir.join("data/train-00000-of-00001.parquet"),
        qa_train: qa_dir.join("data/train-00000-of-00001.parquet"),
        qa_test: qa_dir.join("data/test-00000-of-00001.parquet"),
        captions_dir,
        qa_dir,
    };
    write_rows(&files.captions_train, &caption_rows(spec)?, spec.row_group_size)?;
    write_rows(&files.qa_train, &qa_train_rows(spec)?, spec.row_group_size)?;
    write_rows(&files.qa_test, &qa_test_rows(spec)?, spec.row_group_size)?;
    Ok(files)
}

/// A held-out question for evaluation by generation.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoQuestion {
    /// The picture, PNG.
    pub image_png: Vec<u8>,
    /// e.g. "What colour is the circle?"
    pub question: String,
    /// e.g. "red."
    pub answer: String,
    pub kind: QuestionKind,
}

/// The first word of a text, lower-cased, without punctuation ("Red." -> "red").
fn first_word(s: &str) -> String {
    s.split_whitespace()
        .next()
        .unwrap_or("")
        .chars()
        .take_while(|c| !c.is_ascii_punctuation())
        .collect::<String>()
        .to_lowercase()
}

impl DemoQuestion {
    /// The user turn to render with the generation prompt: the picture, then the question.
    pub fn messages(&self) -> Vec<vsft_data::Message> {
        vec![vsft_data::Message::new("user", vec![vsft_data::Content::image(0), vsft_data::Content::text(self.question.clone())])]
    }

    /// Exact match of the first word (case and punctuation ignored): "red." vs "red".
    pub fn is_correct(&self, generated: &str) -> bool {
        let w = first_word(generated);
        !w.is_empty() && w == first_word(&self.answer)
    }
}

/// The questions of the QA test split under `dir` (the `dir` given to
/// [`write_shapes_dataset`]), read back from its parquet file.
pub fn held_out_questions(dir: &Path) -> Result<Vec<DemoQuestion>> {
    let path = dir.join("qa/data/test-00000-of-00001.parquet");
    let err = |m: String| DemoError::data(&path, m);
    let mut src = vsft_data::open_dataset(&path.to_string_lossy(), None, None).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::with_capacity(src.len());
    for i in 0..src.len() {
        let row = src.get(i).map_err(|e| err(e.to_string()))?;
        let text_of = |m: usize| -> Option<String> {
            row.messages.get(m)?.content.iter().find(|c| c.kind == "text").and_then(|c| c.text.clone())
        };
        let (Some(question), Some(answer)) = (text_of(0), text_of(1)) else {
            return Err(err(format!("row {i}: expected a user question and an assistant answer")));
        };
        let kind = QuestionKind::of_question(&question).ok_or_else(|| err(format!("row {i}: unknown question {question:?}")))?;
        let image = row.images.first().ok_or_else(|| err(format!("row {i}: no image")))?;
        let image_png = image.load().map_err(|e| err(format!("row {i}: {e}")))?.to_vec();
        out.push(DemoQuestion { image_png, question, answer, kind });
    }
    Ok(out)
}

/// Every scene's objects, without pixels: all layouts × shapes × colours (for the vocabulary).
pub(crate) fn all_scenes() -> Vec<Scene> {
    let mut out = Vec::new();
    let layouts: Vec<Vec<Place>> =
        Place::ALL.iter().map(|&p| vec![p]).chain([vec![Place::Left, Place::Right], vec![Place::Top, Place::Bottom]]).collect();
    for places in layouts {
        let n = places.len();
        for s in 0..Shape::ALL.len().pow(n as u32) {
            for c in 0..Colour::ALL.len().pow(n as u32) {
                let objects = (0..n)
                    .map(|i| Object {
                        shape: Shape::ALL[(s / Shape::ALL.len().pow(i as u32)) % Shape::ALL.len()],
                        colour: Colour::ALL[(c / Colour::ALL.len().pow(i as u32)) % Colour::ALL.len()],
                        place: places[i],
                        cx: 0.0,
                        cy: 0.0,
                        r: 0.0,
                        rgb: [0; 3],
                    })
                    .collect();
                out.push(Scene { size: 0, background: [255; 3], objects });
            }
        }
    }
    out
}

/// Exact-match accuracy of generated answers, per question kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Score {
    /// (correct, asked) per kind.
    pub per_kind: std::collections::BTreeMap<QuestionKind, (usize, usize)>,
}

impl Score {
    /// Scores `generated[i]` against `questions[i]` with [`DemoQuestion::is_correct`].
    pub fn new(questions: &[DemoQuestion], generated: &[impl AsRef<str>]) -> Score {
        let mut s = Score::default();
        for (q, g) in questions.iter().zip(generated) {
            let e = s.per_kind.entry(q.kind).or_default();
            e.0 += q.is_correct(g.as_ref()) as usize;
            e.1 += 1;
        }
        s
    }
    /// Fraction correct over all kinds (0 when nothing was asked).
    pub fn overall(&self) -> f64 {
        let (c, n) = self.per_kind.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
        if n == 0 {
            0.0
        } else {
            c as f64 / n as f64
        }
    }
    /// Fraction correct for one kind, if asked.
    pub fn of(&self, kind: QuestionKind) -> Option<f64> {
        self.per_kind.get(&kind).filter(|v| v.1 > 0).map(|&(c, n)| c as f64 / n as f64)
    }
}

/// `colour 38/40 (95%), shape 30/40 (75%), ..., all 170/200 (85%)`
impl std::fmt::Display for Score {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (k, (c, n)) in &self.per_kind {
            write!(f, "{} {c}/{n} ({:.0}%), ", k.name(), 100.0 * *c as f64 / (*n).max(1) as f64)?;
        }
        let (c, n) = self.per_kind.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
        write!(f, "all {c}/{n} ({:.0}%)", 100.0 * self.overall())
    }
}
