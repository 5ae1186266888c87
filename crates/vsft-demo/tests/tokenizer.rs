//! The demo tokenizer and template: valid for the `tokenizers` crate, every word round-trips,
//! the template renders llava-hf style through vsft-data with a working assistant mask.

use std::path::{Path, PathBuf};

use vsft_data::template::{AssistantSpans, Content, Message};
use vsft_data::Processor;
use vsft_demo::{all_texts, demo_model_config, pre_tokenize, vocabulary, write_demo_model_files, write_demo_tokenizer, SPECIAL_TOKENS};

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vsft-demo").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn ids_and_sizes() {
    let dir = tmp("tok-ids");
    let v = write_demo_tokenizer(&dir).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), v.vocab_size);
    assert_eq!(v.vocab_size, vocabulary().len());
    assert_eq!(v.model_vocab_size % 8, 0);
    assert!(v.model_vocab_size >= v.vocab_size && v.model_vocab_size < v.vocab_size + 8);
    for (t, id) in [("<unk>", v.unk_token_id), ("<s>", v.bos_token_id), ("</s>", v.eos_token_id), ("<pad>", v.pad_token_id), ("<image>", v.image_token_id)] {
        assert_eq!(tok.token_to_id(t), Some(id), "{t}");
    }
    assert_eq!(SPECIAL_TOKENS.len(), 5);
    assert!(v.vocab_size < 80, "vocabulary of {} words", v.vocab_size);
}

#[test]
fn every_text_and_word_round_trips() {
    let dir = tmp("tok-rt");
    let v = write_demo_tokenizer(&dir).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    for (id, w) in vocabulary().iter().enumerate() {
        assert_eq!(tok.token_to_id(w), Some(id as u32), "{w}");
        assert_eq!(tok.id_to_token(id as u32).as_deref(), Some(w.as_str()));
        if id >= SPECIAL_TOKENS.len() {
            let enc = tok.encode(w.as_str(), false).unwrap();
            assert_eq!(enc.get_ids(), &[id as u32], "{w}");
            assert_eq!(tok.decode(&[id as u32], true).unwrap(), *w);
        }
    }
    for text in all_texts() {
        let enc = tok.encode(text.as_str(), true).unwrap();
        let ids = enc.get_ids();
        assert_eq!(ids[0], v.bos_token_id, "BOS is added");
        assert!(!ids.contains(&v.unk_token_id), "<unk> in {text:?}");
        assert_eq!(enc.get_tokens()[1..], pre_tokenize(&text)[..], "{text:?}");
        if !text.contains(':') {
            // The WordPiece decoder's cleanup glues . ? , to the word before; not ':'.
            assert_eq!(tok.decode(ids, true).unwrap(), text);
        }
    }
    // Specials are split out of running text; an answer ends at </s>.
    let enc = tok.encode("USER: <image>\nWhat colour is the circle? ASSISTANT: red.</s>", false).unwrap();
    assert_eq!(enc.get_tokens(), ["USER", ":", "<image>", "What", "colour", "is", "the", "circle", "?", "ASSISTANT", ":", "red", ".", "</s>"]);
    assert_eq!(tok.decode(&enc.get_ids()[11..], true).unwrap(), "red.");
    assert_eq!(tok.decode(&enc.get_ids()[11..], false).unwrap(), "red. </s>");
    assert_eq!(tok.decode(&enc.get_ids()[9..13], true).unwrap(), "ASSISTANT : red.");
}

#[test]
fn template_renders_llava_style_and_masks_answers() {
    let dir = tmp("tok-template");
    let v = write_demo_model_files(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json", "generation_config.json"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let p = Processor::from_model_dir(&dir, None).unwrap();
    let messages = vec![
        Message::new("user", vec![Content::image(0), Content::text("What colour is the circle?")]),
        Message::new("assistant", vec![Content::text("red.")]),
        Message::new("user", vec![Content::text("How many shapes are there?")]),
        Message::new("assistant", vec![Content::text("two.")]),
    ];
    let r = p.text.render(&messages, false).unwrap();
    assert_eq!(r.text, "USER: <image>\nWhat colour is the circle? ASSISTANT: red.</s> USER: How many shapes are there? ASSISTANT: two.</s> ");
    let prompt = p.text.render(&messages[..1], true).unwrap();
    assert_eq!(prompt.text, "USER: <image>\nWhat colour is the circle? ASSISTANT:");
    assert!(r.text.starts_with(&prompt.text));

    let enc = p.text.encode(&messages, 1, true, Some(AssistantSpans::Auto)).unwrap();
    assert_eq!(enc.input_ids[0], v.bos_token_id);
    assert_eq!(enc.image_spans, vec![(3, 39)]);
    assert!(enc.input_ids[3..39].iter().all(|&t| t == v.image_token_id));
    let mask = enc.assistant_mask.unwrap();
    let masked: Vec<String> = enc.input_ids.iter().zip(&mask).filter(|(_, &m)| m).map(|(&t, _)| p.text.tokenizer.id_to_token(t).unwrap()).collect();
    assert_eq!(masked, ["red", ".", "</s>", "two", ".", "</s>"]);
    // The prefix method (no {% generation %}) agrees with the generation blocks.
    let by_prefix = p.text.encode(&messages, 1, true, Some(AssistantSpans::Prefix)).unwrap().assistant_mask.unwrap();
    let by_prefix: Vec<String> =
        enc.input_ids.iter().zip(&by_prefix).filter(|(_, &m)| m).map(|(&t, _)| p.text.tokenizer.id_to_token(t).unwrap()).collect();
    assert_eq!(by_prefix, masked);
}

/// `configs/demo-tiny-llava.json` is what `demo_model_config` says; `VSFT_REGEN=1` rewrites it.
#[test]
fn config_file_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/demo-tiny-llava.json");
    let want = demo_model_config(&vsft_demo::demo_vocab_ids());
    let text = serde_json::to_string_pretty(&want).unwrap() + "\n";
    if std::env::var_os("VSFT_REGEN").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(have, text, "{} is out of date: run VSFT_REGEN=1 cargo test -p vsft-demo --test tokenizer", path.display());
    let v = vsft_demo::demo_vocab_ids();
    assert_eq!(want["text_config"]["vocab_size"], v.model_vocab_size);
    assert_eq!(want["image_token_index"], v.image_token_id);
    assert_eq!(want["pad_token_id"], v.pad_token_id);
}
