# WebAssembly example and test modules.
# Included by the top-level Makefile; paths are relative to the repository root.
#
#   make modules            builds $(WASM_OUT)/hello.wasm and every tests/modules/* module

WASM_OUT ?= build/wasm
WASM_CC ?= clang --target=wasm32-wasi -O2
WASM_CFLAGS ?= -Wall -Wextra
WAT2WASM ?= wat2wasm

WASM_EXAMPLES := hello
WASM_TEST_C := $(wildcard tests/modules/*.c)
WASM_TEST_WAT := $(wildcard tests/modules/*.wat)
WASM_MODULES := $(patsubst %,$(WASM_OUT)/%.wasm,$(WASM_EXAMPLES)) \
	$(patsubst tests/modules/%.c,$(WASM_OUT)/%.wasm,$(WASM_TEST_C)) \
	$(patsubst tests/modules/%.wat,$(WASM_OUT)/%.wasm,$(WASM_TEST_WAT)) \
	$(WASM_OUT)/notwasm.txt

.PHONY: modules
modules: $(WASM_MODULES)

$(WASM_OUT):
	mkdir -p $@

# Examples live in images/<name>/<name>.c (a pattern rule can only substitute one %).
define WASM_EXAMPLE_RULE
$(WASM_OUT)/$(1).wasm: images/$(1)/$(1).c | $(WASM_OUT)
	$$(WASM_CC) $$(WASM_CFLAGS) -o $$@ $$<
endef
$(foreach example,$(WASM_EXAMPLES),$(eval $(call WASM_EXAMPLE_RULE,$(example))))

$(WASM_OUT)/%.wasm: tests/modules/%.c | $(WASM_OUT)
	$(WASM_CC) $(WASM_CFLAGS) -o $@ $<

$(WASM_OUT)/%.wasm: tests/modules/%.wat | $(WASM_OUT)
	$(WAT2WASM) -o $@ $<

$(WASM_OUT)/notwasm.txt: tests/modules/notwasm.txt | $(WASM_OUT)
	cp $< $@

# Function modules (abi/http.md): WebAssembly reactors. images/fn-hello and every
# tests/modules/fn_*.c are linked with the C guest SDK (abi/c/layotto.c) except those in
# WASM_FN_NOSDK, which export layotto_http_handle themselves. These explicit rules take
# precedence over the tests/modules/%.c pattern rule above.
WASM_SDK_SRC := abi/c/layotto.c
WASM_SDK_DEPS := $(WASM_SDK_SRC) abi/include/layotto.h
# --strip-debug drops the DWARF that Debian's wasi-libc.a carries (~100 KB per module); the
# name section stays for trap backtraces.
WASM_REACTOR_CC ?= $(WASM_CC) -mexec-model=reactor -Wl,--strip-debug
WASM_FN_NOSDK := fn_badresp
WASM_FN_TEST_C := $(wildcard tests/modules/fn_*.c)
WASM_FN_SDK := $(filter-out $(WASM_FN_NOSDK),$(patsubst tests/modules/%.c,%,$(WASM_FN_TEST_C)))

modules: $(WASM_OUT)/fn-hello.wasm

$(WASM_OUT)/fn-hello.wasm: images/fn-hello/fn-hello.c $(WASM_SDK_DEPS) | $(WASM_OUT)
	$(WASM_REACTOR_CC) $(WASM_CFLAGS) -I abi/include -o $@ $< $(WASM_SDK_SRC)

$(patsubst %,$(WASM_OUT)/%.wasm,$(WASM_FN_SDK)): $(WASM_OUT)/%.wasm: tests/modules/%.c $(WASM_SDK_DEPS) | $(WASM_OUT)
	$(WASM_REACTOR_CC) $(WASM_CFLAGS) -I abi/include -o $@ $< $(WASM_SDK_SRC)

$(patsubst %,$(WASM_OUT)/%.wasm,$(WASM_FN_NOSDK)): $(WASM_OUT)/%.wasm: tests/modules/%.c | $(WASM_OUT)
	$(WASM_REACTOR_CC) $(WASM_CFLAGS) -o $@ $<

# The guest SDKs' examples (examples/: C, Rust, AssemblyScript, Layotto's own ABI).
include images/sdk.mk
