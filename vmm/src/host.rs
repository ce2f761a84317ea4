//! What this host's KVM can do.

use std::fs;
use std::path::Path;

/// KVM provided by the PVM module (pagetable-based virtualization, no VMX/SVM).
pub fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The CPU advertises VMX or SVM.
pub fn has_hardware_virtualization() -> bool {
    fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    })
}

/// Why a standard Linux guest cannot run here, if it cannot.
pub fn linux_guest_limitation() -> Option<String> {
    (is_pvm() && !has_hardware_virtualization()).then(|| {
        "this host's KVM is PVM without VMX/SVM: guest kernel code is instruction-emulated \
         and cannot take exceptions, so a standard Linux kernel stops early in boot. Run on \
         a host with hardware virtualization, or boot a PVM-enabled guest kernel \
         (`microagent doctor` explains)"
            .to_string()
    })
}
