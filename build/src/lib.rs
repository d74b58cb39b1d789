//! `husk build`'s front half (issue 20): a Dockerfile read into stages
//! and steps with BuildKit's meaning (`dockerfile`), its words and
//! variables as BuildKit's shell lexer reads them (`lex`), and the
//! context's `.dockerignore` (`ignore`). Running the steps (each `RUN` in
//! a microVM on the stage's layers), the layer cache and the CLI come on
//! top (docs/build.md).

#![deny(missing_docs)]

pub mod context;
pub mod dockerfile;
pub mod exec;
pub mod ignore;
pub mod layer;
pub mod lex;
