//! Worker threads: the event that ends them when the frontend disconnects.

use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// `VhostUserBackend::exit_event`: without one a worker thread outlives its frontend.
pub fn exit_event(thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
    new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
        .inspect_err(|e| log::error!("worker {thread_index}: no exit event: {e}"))
        .ok()
}
