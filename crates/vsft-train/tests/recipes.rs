//! Every recipe shipped in recipes/ parses (stages and all): known keys, right types, a valid stage.

use std::path::Path;

use vsft_train::recipe::Recipe;

#[test]
fn shipped_recipes_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            Recipe::parse_stages(&text, &path.display().to_string(), &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 4, "found {n} recipes");
}
