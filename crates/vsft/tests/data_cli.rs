//! `vsft data inspect` on bad rows: stops at the first with its error (exit 1) unless
//! `--skip-bad-rows`, whose report lists the rows skipped; `--image-folder` for LLaVA JSON.

mod common;

use common::{root, vsft};

#[test]
fn data_inspect_stops_at_the_first_bad_row() {
    let fx = root().join("tests/fixtures/data");
    let bad = fx.join("bad/unknown_role.parquet");
    let inspect = || {
        let mut c = vsft();
        c.args(["data", "inspect", "--model"]).arg(fx.join("model")).arg("--data").arg(&bad).arg("--chat-template").arg(fx.join("llava_hf.jinja"));
        c
    };
    let out = inspect().output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("unknown_role.parquet: row 2: field `messages[0].role`: unknown role"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = inspect().arg("--skip-bad-rows").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("rows skipped: unknown role: 1 row ({} row 2)", bad.display())), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("=== example 0"));

    let out = vsft()
        .args(["data", "inspect", "--limit", "1", "--model"])
        .arg(fx.join("model"))
        .arg("--data")
        .arg(fx.join("llava.json"))
        .arg("--image-folder")
        .arg(fx.join("images"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
