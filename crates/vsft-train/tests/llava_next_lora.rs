//! Stage 2 on LLaVA-NeXT against transformers + PEFT (scripts/make_llava_next_model_fixtures.py):
//! starting from PEFT's own initial adapter, six AdamW steps (LoRA lr 1e-3, projector 2e-4,
//! weight decay 0.1 on weights, global clipping at 1.0, three batches of real photographs
//! cycled) give PEFT's losses and gradient norms; the adapter vsft writes has PEFT's keys, and
//! loaded again it gives the loss PEFT computes with its own final adapter.

mod common;

#[test]
fn six_lora_steps_match_peft_and_the_adapter_round_trips() {
    common::check_llava_next_lora::<burn::backend::Autodiff<burn::backend::Flex>>(1.0, "llava-next-adapter");
}
