//! Writes the CRDs of both charts from the Rust types: `cargo run -p hub --bin crdgen`
//! (from the repository root; `--check` only compares and exits 1 on a difference).

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut differ = false;
    for (path, crd) in [
        (hub::crd::IBGU_PATH, hub::crd::ibgu()),
        (hub::crd::IBU_PATH, hub::crd::ibu()),
    ] {
        let file = root.join(path);
        let text = hub::crd::to_yaml(&crd);
        let same = std::fs::read_to_string(&file).is_ok_and(|t| t == text);
        if check {
            if !same {
                eprintln!("{path} differs from the types: run `cargo run -p hub --bin crdgen`");
                differ = true;
            }
            continue;
        }
        if let Some(dir) = file.parent()
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            eprintln!("creating {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
        if let Err(e) = std::fs::write(&file, text) {
            eprintln!("writing {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
        println!("{} {path}", if same { "unchanged" } else { "wrote" });
    }
    if differ {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
