//! What a client may do: channel namespaces and their options ([`namespace`]), and the tokens that say
//! who a client is and which private channels it may join ([`auth`]). Pure decisions over validated
//! configuration: no IO, no state; the session asks, and maps the answer to the protocol.

pub mod auth;
pub mod namespace;
