//! Finding libnccl (on every build: a GPU build opens it the same way before its first rank
//! joins). The search order, the error when it is missing (every name tried, how to install
//! it), and a library that loads but is not NCCL.

use vsft_train::nccl::{library_candidates, probe_library, LIBRARY_NAMES};

/// One test for everything that reads `VSFT_NCCL_LIBRARY`: tests run as threads of one process.
#[test]
fn the_search_order_and_the_default_search() {
    assert_eq!(LIBRARY_NAMES, ["libnccl.so.2", "libnccl.so"]);
    // SAFETY (set_var): the only test of this binary that reads the environment.
    unsafe { std::env::set_var("VSFT_NCCL_LIBRARY", "/opt/nccl/lib/libnccl.so.2.21.5") };
    assert_eq!(library_candidates(), ["/opt/nccl/lib/libnccl.so.2.21.5", "libnccl.so.2", "libnccl.so"]);
    unsafe { std::env::remove_var("VSFT_NCCL_LIBRARY") };
    assert_eq!(library_candidates(), ["libnccl.so.2", "libnccl.so"]);
    match probe_library(&library_candidates()) {
        // A machine with NCCL installed: its version, as NCCL prints it.
        Ok((version, path)) => assert!(version.split('.').count() == 3 && version.starts_with("2."), "{version} from {path}"),
        Err(e) => assert!(e.to_string().contains("tried libnccl.so.2 ("), "{e}"),
    }
}

#[test]
fn a_missing_library_is_named_with_every_name_tried() {
    let names = vec!["/nonexistent/libnccl.so.2".to_string(), "libnccl-not-installed.so.2".to_string()];
    let e = probe_library(&names).unwrap_err().to_string();
    assert!(e.starts_with("NCCL not found; tried /nonexistent/libnccl.so.2 ("), "{e}");
    assert!(e.contains("libnccl-not-installed.so.2 ("), "{e}");
    assert!(e.contains("pip install nvidia-nccl-cu12") && e.contains("VSFT_NCCL_LIBRARY"), "{e}");
}

#[test]
fn a_library_that_is_not_nccl_is_refused() {
    // libc loads everywhere and has none of NCCL's functions.
    let e = probe_library(&["libc.so.6".to_string()]).unwrap_err().to_string();
    assert_eq!(e, "libc.so.6: it has no ncclGetVersion: not a usable NCCL library");
}
