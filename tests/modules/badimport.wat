;; A command module whose import no host provides: instantiation must fail cleanly.
(module
  (import "env" "layotto_not_provided" (func $missing))
  (memory (export "memory") 1)
  (func (export "_start")
    call $missing))
