//! The demo's tokenizer and processor files: a word-level `tokenizer.json` over exactly the
//! words of the dataset and chat template, the llava-hf style chat template, the CLIP
//! processor files, and the matching tiny LLaVA `config.json`.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{create_dir, write_file, Result};
use crate::shapes::{all_scenes, CAPTION_PROMPTS};

/// Special tokens, in id order: `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3, `<image>`=4.
pub const SPECIAL_TOKENS: [&str; 5] = ["<unk>", "<s>", "</s>", "<pad>", "<image>"];

/// llava-hf's llava-1.5 template, with two changes so a model trained on it learns to stop
/// and can be trained on its answers only: each assistant turn ends with `eos_token`, and the
/// answer and that `</s>` sit in `{% generation %}`. Renders
/// `USER: <image>\nWhat colour is the circle? ASSISTANT: red.</s> `; the generation prompt is
/// `ASSISTANT:`. Tokenization ignores the whitespace (word-level tokenizer).
pub const CHAT_TEMPLATE: &str = concat!(
    "{% for message in messages %}",
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}",
    "{% if message['role'] != 'assistant' %}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}",
    "{% else %}",
    "{% generation %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{ eos_token }}{% endgeneration %}{{ ' ' }}",
    "{% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}",
);

pub fn chat_template() -> &'static str {
    CHAT_TEMPLATE
}

/// The ids the model config must agree with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoVocab {
    /// Number of tokens in `tokenizer.json` (specials included).
    pub vocab_size: usize,
    /// `vocab_size` rounded up to a multiple of 8: `text_config.vocab_size`.
    pub model_vocab_size: usize,
    pub unk_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    pub image_token_id: u32,
}

/// Splits like the `BertPreTokenizer` the tokenizer uses: on whitespace, and every ASCII
/// punctuation character is a word of its own.
pub fn pre_tokenize(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for w in text.split_whitespace() {
        let mut cur = String::new();
        for c in w.chars() {
            if c.is_ascii_punctuation() {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(c.to_string());
            } else {
                cur.push(c);
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    out
}

/// Every text the dataset can contain (all prompts, captions, questions and answers of all
/// possible scenes) and the template's role names.
pub fn all_texts() -> Vec<String> {
    let mut t: BTreeSet<String> = CAPTION_PROMPTS.iter().map(|s| s.to_string()).collect();
    t.insert("USER: ASSISTANT:".into());
    for scene in all_scenes() {
        t.insert(scene.caption());
        for (_, q, a) in scene.questions() {
            t.insert(q);
            t.insert(a);
        }
    }
    t.into_iter().collect()
}

/// The vocabulary in id order: the special tokens, then the words of [`all_texts`] sorted.
pub fn vocabulary() -> Vec<String> {
    let words: BTreeSet<String> = all_texts().iter().flat_map(|t| pre_tokenize(t)).collect();
    SPECIAL_TOKENS.iter().map(|s| s.to_string()).chain(words).collect()
}

fn demo_vocab(vocab_size: usize) -> DemoVocab {
    DemoVocab {
        vocab_size,
        model_vocab_size: vocab_size.div_ceil(8) * 8,
        unk_token_id: 0,
        bos_token_id: 1,
        eos_token_id: 2,
        pad_token_id: 3,
        image_token_id: 4,
    }
}

/// The ids of [`vocabulary`] without writing anything.
pub fn demo_vocab_ids() -> DemoVocab {
    demo_vocab(vocabulary().len())
}

fn tokenizer_json(vocab: &[String]) -> Value {
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let mut map = serde_json::Map::new();
    for (i, w) in vocab.iter().enumerate() {
        map.insert(w.clone(), json!(i));
    }
    let bos = |type_id: u32| json!({"SpecialToken": {"id": "<s>", "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos(0), seq("A", 0)],
            "pair": [bos(0), seq("A", 0), bos(1), seq("B", 1)],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordLevel", "vocab": Value::Object(map), "unk_token": "<unk>"}
    })
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).expect("JSON values serialise") + "\n"
}

/// Writes `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` and
/// `chat_template.jinja` into `dir` (created if needed).
pub fn write_demo_tokenizer(dir: &Path) -> Result<DemoVocab> {
    create_dir(dir)?;
    let vocab = vocabulary();
    write_file(&dir.join("tokenizer.json"), pretty(&tokenizer_json(&vocab)))?;
    let mut decoder = serde_json::Map::new();
    for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
        decoder.insert(
            i.to_string(),
            json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}),
        );
    }
    let config = json!({
        "added_tokens_decoder": Value::Object(decoder),
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": true,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": true,
        "model_max_length": 512,
        "padding_side": "right",
        "processor_class": "LlavaProcessor",
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    write_file(&dir.join("tokenizer_config.json"), pretty(&config))?;
    let map = json!({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"});
    write_file(&dir.join("special_tokens_map.json"), pretty(&map))?;
    write_file(&dir.join("chat_template.jinja"), CHAT_TEMPLATE)?;
    Ok(demo_vocab(vocab.len()))
}

/// Image side of the demo model.
pub const IMAGE_SIZE: u32 = 84;
pub const PATCH_SIZE: u32 = 14;

/// `preprocessor_config.json` (CLIP, `size` pixels, no resize needed for demo pictures)
/// and `processor_config.json` (patch 14, strategy `default`, one CLS token).
pub fn write_processor_files(dir: &Path, size: u32, patch: u32) -> Result<()> {
    create_dir(dir)?;
    let image_processor = json!({
        "crop_size": {"height": size, "width": size}, "do_center_crop": true, "do_convert_rgb": true,
        "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1.0 / 255.0,
        "size": {"shortest_edge": size}, "processor_class": "LlavaProcessor"
    });
    let processor = json!({
        "image_processor": image_processor, "image_token": "<image>", "num_additional_image_tokens": 1,
        "patch_size": patch, "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"
    });
    write_file(&dir.join("preprocessor_config.json"), pretty(&image_processor))?;
    write_file(&dir.join("processor_config.json"), pretty(&processor))
}

/// The tiny LLaVA of the demo (`configs/demo-tiny-llava.json`): text 128 wide, 4 layers,
/// 4 heads; CLIP 64 wide, 3 layers, 4 heads, 84 px, patch 14 (36 image tokens).
pub fn demo_model_config(v: &DemoVocab) -> Value {
    let n_patches = (IMAGE_SIZE / PATCH_SIZE).pow(2);
    json!({
        "model_type": "llava",
        "image_token_index": v.image_token_id,
        "pad_token_id": v.pad_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": n_patches,
        "text_config": {
            "model_type": "llama",
            "vocab_size": v.model_vocab_size,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-05,
            "bos_token_id": v.bos_token_id,
            "eos_token_id": v.eos_token_id
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE
        },
        "tie_word_embeddings": false
    })
}

/// Tokenizer files, processor files and `generation_config.json` for the demo model, in
/// `dir` (the binary adds `config.json` from [`demo_model_config`] and the weights).
pub fn write_demo_model_files(dir: &Path) -> Result<DemoVocab> {
    let v = write_demo_tokenizer(dir)?;
    write_processor_files(dir, IMAGE_SIZE, PATCH_SIZE)?;
    let gen = json!({"bos_token_id": v.bos_token_id, "eos_token_id": v.eos_token_id, "pad_token_id": v.pad_token_id});
    write_file(&dir.join("generation_config.json"), pretty(&gen))?;
    Ok(v)
}
