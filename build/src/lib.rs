//! `husk build` (issue 20, docs/build.md): a Dockerfile read into stages
//! and steps with BuildKit's meaning (`dockerfile`), its words and
//! variables as BuildKit's shell lexer reads them (`lex`), the context's
//! `.dockerignore` (`ignore`), COPY's sources found and copied without
//! leaving the context or the image's root (`context`), a step's overlay
//! upper directory written as an OCI layer (`layer`), and the build run:
//! `RUN` in a microVM, the cache, the image into the store (`exec`).

#![deny(missing_docs)]

pub mod context;
pub mod dockerfile;
pub mod exec;
pub mod ignore;
pub mod layer;
pub mod lex;
