# The guest SDKs (abi/) and the example functions built on them (images/examples/).
# Included by images/build.mk; paths are relative to the repository root.
#
#   make modules     also builds every example into $(WASM_OUT):
#
#   module                 language / SDK                           what it is
#   faas_fn1               C, abi/c/layotto{,_sdk}.c                Layotto FaaS function_1 (id_1)
#   faas_fn2               C, abi/c/layotto{,_sdk}.c                Layotto FaaS function_2 (id_2)
#   faas_fn2_rs            Rust, abi/rust/layotto                   function_2 in Rust
#   faas_fn1_as            AssemblyScript, abi/assemblyscript       function_1 in AssemblyScript
#   layotto_fn1            C, Layotto's own ABI (env), a command    function_1 as Layotto's demo has it
#   layotto_fn2            C, Layotto's own ABI (env), a reactor    function_2 as Layotto's demo has it
#   pubsub_publisher       AssemblyScript                           publishes to pub_subs_demo/orders
#   pubsub_subscriber      C                                        POST /orders -> state_demo[last_order]
#   lock_example           C                                        lock_demo + sequencer_demo
#
# Toolchains (Debian 12 packages, plus the npm registry):
#   C               clang lld wasi-libc (as the rest of build.mk)
#   Rust            rustc libstd-rust-dev-wasm32: Debian's rustc (/usr/bin/rustc) with its std for
#                   wasm32-wasi; no cargo, no crates. A rustup toolchain earlier in PATH has no wasm
#                   std here, hence the absolute path.
#   AssemblyScript  node >= 20 and npm: `npm ci` in abi/assemblyscript (package-lock.json).

# ---- C --------------------------------------------------------------------------------------

SDK_C_SRC := abi/c/layotto.c abi/c/layotto_sdk.c
SDK_C_DEPS := $(SDK_C_SRC) abi/include/layotto.h abi/include/layotto_sdk.h abi/include/layotto_abi.h
SDK_C_EXAMPLES := faas_fn1 faas_fn2 pubsub_subscriber lock_example

# Function modules on the C SDK: reactors exporting layotto_http_handle.
define SDK_C_RULE
$(WASM_OUT)/$(1).wasm: images/examples/$(1)/$(1).c $(SDK_C_DEPS) | $(WASM_OUT)
	$$(WASM_REACTOR_CC) $$(WASM_CFLAGS) -I abi/include -o $$@ $$< $(SDK_C_SRC)
endef
$(foreach m,$(SDK_C_EXAMPLES),$(eval $(call SDK_C_RULE,$(m))))

# Layotto's own ABI (module env, proxy-wasm callbacks), no SDK: layotto_fn1 is a WASI command
# (`_start`, like the TinyGo function_1 of Layotto's demo), layotto_fn2 a reactor.
$(WASM_OUT)/layotto_fn1.wasm: images/examples/layotto_fn1/layotto_fn1.c | $(WASM_OUT)
	$(WASM_CC) -Wl,--strip-debug $(WASM_CFLAGS) -o $@ $<

$(WASM_OUT)/layotto_fn2.wasm: images/examples/layotto_fn2/layotto_fn2.c | $(WASM_OUT)
	$(WASM_REACTOR_CC) $(WASM_CFLAGS) -o $@ $<

# ---- Rust -----------------------------------------------------------------------------------

WASM_RUSTC ?= /usr/bin/rustc
WASM_RUST_SYSROOT := $(shell $(WASM_RUSTC) --print sysroot 2>/dev/null)
# Rust >= 1.78 calls the target wasm32-wasip1 (and dropped wasm32-wasi in 1.84).
WASM_RUST_TARGET ?= $(if $(wildcard $(WASM_RUST_SYSROOT)/lib/rustlib/wasm32-wasip1),wasm32-wasip1,wasm32-wasi)
# A cdylib gets no crt1: linking crt1-reactor.o makes it a reactor (`_initialize` runs wasi-libc's
# constructors once) instead of a "command" whose every export re-runs them.
WASM_RUST_CRT := $(WASM_RUST_SYSROOT)/lib/rustlib/$(WASM_RUST_TARGET)/lib/self-contained/crt1-reactor.o
WASM_RUSTFLAGS ?= -O -C strip=debuginfo
WASM_RUST := $(WASM_RUSTC) --edition 2021 --target $(WASM_RUST_TARGET) $(WASM_RUSTFLAGS)
SDK_RUST_LIB := build/rust/$(WASM_RUST_TARGET)/liblayotto.rlib
SDK_RUST_EXAMPLES := faas_fn2_rs

$(SDK_RUST_LIB): abi/rust/layotto/src/lib.rs
	@mkdir -p $(@D)
	$(WASM_RUST) --crate-type rlib --crate-name layotto -o $@ $<

define SDK_RUST_RULE
$(WASM_OUT)/$(1).wasm: images/examples/$(1)/$(1).rs $(SDK_RUST_LIB) | $(WASM_OUT)
	$$(WASM_RUST) --crate-type cdylib --extern layotto=$(SDK_RUST_LIB) \
		-C link-arg=$$(WASM_RUST_CRT) -o $$@ $$<
endef
$(foreach m,$(SDK_RUST_EXAMPLES),$(eval $(call SDK_RUST_RULE,$(m))))

# ---- AssemblyScript -------------------------------------------------------------------------

SDK_AS_DIR := abi/assemblyscript
SDK_AS_STAMP := $(SDK_AS_DIR)/node_modules/.installed
SDK_AS_SRC := $(SDK_AS_DIR)/assembly/layotto.ts
ASC := $(SDK_AS_DIR)/node_modules/.bin/asc
# abort -> layotto_abort (a log line, then a trap): the module imports nothing but layotto.*.
# --exportStart: the top-level code (which registers the handler) runs from `_initialize`.
WASM_ASCFLAGS ?= -O3 --runtime incremental --exportStart _initialize --use abort=layotto_abort
SDK_AS_EXAMPLES := faas_fn1_as pubsub_publisher

$(SDK_AS_STAMP): $(SDK_AS_DIR)/package.json $(SDK_AS_DIR)/package-lock.json
	cd $(SDK_AS_DIR) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

define SDK_AS_RULE
$(WASM_OUT)/$(1).wasm: images/examples/$(1)/$(1).ts $(SDK_AS_SRC) $(SDK_AS_STAMP) | $(WASM_OUT)
	$$(ASC) $$< -o $$@ $$(WASM_ASCFLAGS)
endef
$(foreach m,$(SDK_AS_EXAMPLES),$(eval $(call SDK_AS_RULE,$(m))))

# ---- all of them ------------------------------------------------------------------------------

SDK_EXAMPLES := $(SDK_C_EXAMPLES) layotto_fn1 layotto_fn2 $(SDK_RUST_EXAMPLES) $(SDK_AS_EXAMPLES)
SDK_EXAMPLE_MODULES := $(patsubst %,$(WASM_OUT)/%.wasm,$(SDK_EXAMPLES))

.PHONY: examples
examples: $(SDK_EXAMPLE_MODULES)
modules: $(SDK_EXAMPLE_MODULES)
