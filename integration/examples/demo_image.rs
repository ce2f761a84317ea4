//! `make demo` on hosts without VMX/SVM: writes the demo workspace image (busybox-static
//! with its applets, a root and an `app` user) as an OCI image layout at the given
//! directory, tag v1, for the demo to push to a registry inside the nested rig.

use microagent_integration::registry::{workspace_layer, write_image_layout};
use std::path::PathBuf;

fn main() {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: demo_image DIR");
        std::process::exit(2);
    };
    let _ = std::fs::remove_dir_all(&dir);
    write_image_layout(&dir, &[(workspace_layer(), true)]);
    println!("{}", dir.display());
}
