//! Greedy generation with the KV cache equals transformers' `generate` token for token
//! (fixtures from scripts/make_model_fixtures.py; the check is shared with the backend suite).

use burn::backend::Flex;

mod common;

#[test]
fn greedy_generation_matches_transformers() {
    for name in common::CONFIGS {
        common::check_greedy_generation::<Flex>(name);
    }
}
