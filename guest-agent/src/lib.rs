//! guest agent, /init in every workspace (issue 6): not implemented yet.
