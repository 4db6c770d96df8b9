# Sourced by the scripts: puts a rustup-installed cargo on PATH when the shell lacks it.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  . "$HOME/.cargo/env"
fi
