#!/usr/bin/env bash
# The GPU measurements still owed by the open issues, cut into stages of one device call each (at most 10
# minutes a call, about 30 minutes of device time a session). Run from the project root on the GPU machine:
#
#   bash benchmarks/device_rounds.sh STAGE        # logs and JSON go to $OUT (the device tool brings them back)
#
# Stages, in the order they pay off (the first two are what resolving issues 24 and 25 needs before any
# number: the GPU tests):
#   gpu-tests          every GPU test at once, spread over TEST_WORKERS (default 6) processes sharing the GPU
#                      (pytest-xdist, in the device image: Triton's compilations, which bound these tests, run in
#                      parallel); each test's name and outcome in the log, a JUnit XML of them in $OUT
#   gpu-tests-compile  the compiled-model GPU tests alone (torch.compile fullgraph and reduce-overhead, unpadded,
#                      padded and packed; about 3 minutes): the tenth round fixed their last failures without a rerun
#   gpu-tests-kernels  the block backend's, the Triton kernel's and the decode kernel's GPU tests
#   gpu-tests-models   the GPU tests through models: integration, generation, packed/padded, learned, patterns
#   bench-model        issue 24: the encoder step at 16k in eager, compile and reduce-overhead modes, unpadded,
#                      padded and packed batches, against the fastest dense step of the run
#   bench-decoder      issue 24: the decoder forward, 4k-32k (with its default cache; CACHE=0: use_cache=False)
#   bench-attention    issue 24: the backend's own choice per cell against every method, 8k-32k, D 64 and 128
#                      (HEAD_DIMS=64 and HEAD_DIMS=128 in two calls where one does not fit)
#   bench-generate     issue 25: prefill and decode of the 1B shape, 4k-64k, batch 1 and 16
#   bench-generate-32k issue 25's cell (32k, batch 16, dynamic cache), twice (RUN=1, RUN=2): the second process's
#                      first prefill is what a generate() call pays once the machine has compiled the kernels
#   bench-generate-static  issue 25: static cache under reduce-overhead at 32k, batch 16 (METHODS: a subset)
#   bench-generate-64k issue 25's 64k prefill target (2.5x), batches 1 and 8 (batch 16 at 64k needs about 100 GiB
#                      at this shape: an H200's, not an H100's), dynamic cache, then the 135M shape at 32k, batch 16
#   bench-generate-ceiling  issue 25: 32k and 64k at batches 1 and 8 (dense, dense-flash, sparse, sparse-evict), then
#                      benchmarks/prefill_ceiling.py on them: the sparse prefill against the ceiling the model's work
#                      outside attention sets (the seventeenth round's fit, measured in one run; 32k at batch 1 never
#                      ran on an H100)
#   generate-round     issue 25: bench-generate-static (dense, sparse), bench-generate-32k (RUN=1) and profile-decode in
#                      one call, each under a time limit
#   decode-sdpa        issue 25: why dense SDPA decodes slowly (cuDNN re-planning at every new key length?),
#                      benchmarks/decode_sdpa_backend.py, about a minute
#   profile-decode     issue 25: where the sparse decoding step's time goes (dynamic cache, 32k, batch 16: 381
#                      tokens/s against 754 for dense off cuDNN in the fourteenth round), a few minutes
#   profile-prefill    issue 25: where the sparse prefill's time goes (32k, batch 16: 3.0 s against dense's 5.1 in the
#                      fifteenth round; issue 25 asks 1.8x), a few minutes
#   profile-compile    issue 24: where the host time of the encoder step goes under torch.compile(model) against
#                      eager (benchmarks/profile_model_step.py; launches, syncs, top host operators), a few minutes
#   profile-host       issue 24: where an eager attention call's host time goes (256-356 us a forward call in the
#                      nineteenth round's eager step), layer by layer of the call, and a cProfile of the backend's
#                      calls (benchmarks/profile_attention_host.py, about a minute)
#   eager-floor        issue 24: the eager encoder step with attention taken out (its output the value tensor, no
#                      launch) against dense and sparse, eagerly and as CUDA graphs: the fastest any attention kernel
#                      can make an eager step (benchmarks/eager_floor.py, a minute or two; FLOOR_MODES adds compile)
#   owed-30            issue 24: eager-floor with FLOOR_MODES=eager,compile,graph (the compiled step's floor, host time
#                      a step, the operators without launches), unpadded, then benchmarks/partial_tile_cost.py (what the
#                      partial tiles' mask loads cost the kernel, against flex_mask; sliding, D 128 and 64), in one call
#   owed-31            issue 24: the GPU tests through models (the gradients now in their inputs' layout), eager-floor
#                      (eager and compiled, with the launchless row and the allocator's calls), partial_tile_cost.py at
#                      D 128, in one call (about 9 minutes; with little device time left, FLOOR_MODES=compile and
#                      TESTS_TIMEOUT=120 PROFILE_TIMEOUT=150 BENCH_TIMEOUT=120 fit about 7)
#   direct             issue 24: the kernels launched through their compiled binaries (triton_launch): GPU tests, an
#                      attention call's host time, the encoder step eagerly and compiled, with and without (8 minutes)
#   compile-order      issue 24: the compiled step in a fresh process, after a reduce-overhead cell, and the kernels'
#                      launches through their binaries in each (benchmarks/compile_after_capture.py, 5 minutes)
#   owed-h200          issue 24: eager-floor (unpadded and padding-free) and bench-model over the three modes (unpadded)
#                      in one call, each under its own time limit: what the twentieth round (H100 only) left owed
#   owed-22            issue 24: the kernel against flex_mask (16k, sliding, D 64, queued timing), then the decoder with
#                      its cache at 4k and 32k (unpadded, packed): what the twenty-second round left owed
#   split-forward      issue 24: the forward walking long rows in chunks (the default since the twenty-fourth round;
#                      SPARSEATTN_TRITON_SPLIT_FORWARD=0 walks each row in one program): its GPU tests, then the encoder
#                      step under reduce-overhead (padding-free, unpadded) and its kernels' profile, without and with it
#   fused-backward     issue 24: the encoder step under reduce-overhead (padding-free, unpadded) with the two-pass and
#                      the fused backward (BlockSparseBackend(backward=...)), tiles of 128 and 64, then the fused
#                      step's kernels; first the padded and packed model tests with the fused backward (about 8 minutes)
#   tests-fused        gpu-tests (8 workers, 250 s), then the padding-free step with both backwards at tiles of 64 (TILES),
#                      in one call (about 9 minutes)
#   flex-retry         issue 24: AP's flex_mask with FlexAttention tiles of 64 (the default ones ask for more shared memory
#                      than Hopper has) and the kernel, in one process
#   queued             issue 24: the 16k encoder step, steps queued back to back and each waited for, reduce-overhead
#                      (MODES), padding-free and unpadded (BATCHES), tiles of 64 and 128 (TILES; auto: the backend's
#                      choice by head size)
#   split-forward-attention  issue 24: bench attention at 16k (three layouts, D 64 and 128; dense_packed and the kernel)
#                      without and with the split forward: BigBird's global rows and AP's dense rows are long rows too
#   study-start SPEC, study-wait SPEC   a study's sweep in the background across calls of one warm machine
#                      (lm-study-start / lm-study-wait: the LM study); the three-seed studies of issue 26 too:
#                      studies/attention_pruning.yaml, learned_vs_bigbird_sst2.yaml, learned_vs_bigbird_small.yaml
#   lm-study           issue 20: the language-model Attention Pruning study (resumable: carry its database
#                      back in with the next call, see studies/README.md); needs `device-bundle SST-2 books`
# Record each table with its command, device and date in docs/benchmarks.md. Before a device session, `make
# test-image` runs the suite on the CPU under the image's torch and transformers, which trace differently from the
# CPU pins (the fifteenth round's graph break passed CI's torch 2.13 and broke on the image's 2.11).
set -euo pipefail
stage=${1:?"usage: $0 STAGE [SPEC] (see the header for the list)"}
out=${OUT:-out/device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=src
# the tests' default model where the packaged one is not installed (the device bundle's copy)
[[ -d .bundle/model ]] && export SPARSEATTN_DEFAULT_MODEL=${SPARSEATTN_DEFAULT_MODEL:-.bundle/model}
log="$out/$stage.log"
# Compiled kernels and the autotuner's timings, kept from one device session to the next: a fresh machine spends
# minutes compiling and autotuning before its first number (bench-attention's first cell took 340 s in the eighteenth
# round). Each stage leaves $OUT/device-cache.tar.gz; unpack it at the project root (tar xzf) and carry .device-cache
# into the next session's calls (it counts towards carry's 64 MiB with .bundle; the bench stages need no bundle)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.device-cache/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.device-cache/inductor}
keep_cache() {
  [[ -d .device-cache ]] || return 0
  tar czf "$out/device-cache.tar.gz" .device-cache 2>/dev/null || return 0
  local mib=$(( $(stat -c %s "$out/device-cache.tar.gz") >> 20 )) max=${CACHE_MAX_MIB:-40}
  if (( mib > max )); then  # a cache too large to carry back in is left out
    rm -f "$out/device-cache.tar.gz"
    echo "device cache: ${mib} MiB compressed, over CACHE_MAX_MIB=${max}: not kept" >&2
  fi
}
trap keep_cache EXIT
# the 16k encoder step of bench model, 10 steps, in its own process under $1 seconds, its JSON to $2; the other
# arguments are bench model's (modes, batches, tile, backward)
encoder_step() {
  local limit=$1 json=$2
  shift 2
  timeout "$limit" python -m sparseattn.cli bench model --models encoder --lengths 16k --steps 10 --json "$json" "$@" 2>&1
}
# benchmarks/partial_tile_cost.py under $1 seconds, its JSON to $out, the other arguments its own; FlexAttention's
# repeated warnings (its online softmax at long rows) filtered out of the log
partial_tiles() {
  local limit=$1
  shift
  timeout "$limit" python benchmarks/partial_tile_cost.py --json "$out/partial_tile_cost.json" "$@" 2>&1 \
    | grep -v -i "online softmax\|split the reduction\|important use case\|warnings.warn\|^ *$" | tee -a "$log"
}
# the step under reduce-overhead with the two-pass and the fused backward, each tile size of $1 (spaces), batch kinds
# $2, each run under $3 seconds
backward_ab() {
  for bs in $1; do
    for bw in two-pass fused; do
      echo "== block size $bs, backward $bw" | tee -a "$log"
      encoder_step "$3" "$out/bench_model_b${bs}_$bw.json" --modes reduce-overhead --batches "$2" --block-size "$bs" \
        --backward "$bw" | grep -E "^(model|encoder) " | tee -a "$log" || true
    done
  done
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$log"
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'triton', triton.__version__)" | tee -a "$log"

case $stage in
  gpu-tests)
    SPARSEATTN_TRITON_AUTOTUNE=0 timeout ${TESTS_TIMEOUT:-570} python -m pytest -v -p no:cacheprovider -m gpu \
      -n "${TEST_WORKERS:-6}" --timeout 300 --junitxml "$out/gpu-tests.xml" \
      tests/test_block_gpu.py tests/test_triton_kernel.py tests/test_decode_kernel.py tests/test_generate.py \
      tests/test_hf_integration.py tests/test_packed_padded.py tests/test_learned.py tests/test_patterns.py \
      tests/test_finetune_pack.py 2>&1 | grep -v "torch.__trace" | tee -a "$log" || true ;;
  gpu-tests-compile)
    SPARSEATTN_TRITON_AUTOTUNE=0 timeout ${TESTS_TIMEOUT:-560} python -m pytest -v -p no:cacheprovider -m gpu tests/test_block_gpu.py \
      -k "one_graph or never_wait" 2>&1 | grep -v "torch.__trace" | tee -a "$log" || true ;;
  gpu-tests-kernels)
    # fixed kernel configurations: autotuning every test's shapes would take the call's time
    SPARSEATTN_TRITON_AUTOTUNE=0 timeout ${TESTS_TIMEOUT:-560} python -m pytest -q -p no:cacheprovider -m gpu \
      tests/test_block_gpu.py tests/test_triton_kernel.py tests/test_decode_kernel.py 2>&1 | tee -a "$log" || true ;;
  gpu-tests-models)
    SPARSEATTN_TRITON_AUTOTUNE=0 timeout ${TESTS_TIMEOUT:-560} python -m pytest -q -p no:cacheprovider -m gpu \
      tests/test_generate.py tests/test_hf_integration.py tests/test_packed_padded.py tests/test_learned.py \
      tests/test_patterns.py tests/test_finetune_pack.py 2>&1 | tee -a "$log" || true ;;
  bench-model)
    # MODES=reduce-overhead BATCHES=padded,padding-free: issue 24's padded target where it may be met (padding-free
    # under CUDA graphs ran only with the 16k plan's 83% on 9.3k tokens, twelfth round: 1.84x the fastest dense)
    python -m sparseattn.cli bench model --models encoder --lengths 16k --modes "${MODES:-eager,compile,reduce-overhead}" \
      --batches "${BATCHES:-unpadded,padded,packed,padding-free}" --steps 5 --json "$out/bench_model.json" 2>&1 | tee -a "$log" ;;
  bench-decoder)
    # LENGTHS cuts it into calls: 16k and 32k in both modes took about 5 minutes (twenty-first round, H100).
    # CACHE=0: the decoder called with use_cache=False (--no-decoder-cache) rather than with its default cache
    nocache=$([[ ${CACHE:-1} == 0 ]] && echo --no-decoder-cache || true)
    python -m sparseattn.cli bench model --models decoder --lengths "${LENGTHS:-4k,16k,32k}" \
      --modes "${MODES:-eager,reduce-overhead}" --batches "${BATCHES:-unpadded,padded,packed}" --steps 5 \
      $nocache --json "$out/bench_decoder${nocache:+_nocache}.json" 2>&1 | tee -a "$log" ;;
  bench-attention)
    # HEAD_DIMS / LENGTHS cut the grid into calls of 10 minutes (autotuning and FlexAttention's compilation per cell)
    python -m sparseattn.cli bench attention --head-dims "${HEAD_DIMS:-64,128}" --lengths "${LENGTHS:-8k,16k,32k}" \
      --sparsity 90 --methods dense,dense_packed,flex_mask,block,triton,backend \
      --json "$out/bench_attention_d$(tr , - <<< "${HEAD_DIMS:-64,128}").json" 2>&1 | tee -a "$log" ;;
  bench-generate)
    python -m sparseattn.cli bench generate --models 1b --lengths 4k,16k,32k,64k --batches 1,16 \
      --json "$out/bench_generate.json" 2>&1 | tee -a "$log" ;;
  bench-generate-32k)
    # Run it twice on one warm machine (RUN=1, RUN=2): the first process compiles and autotunes the block kernel
    # (Triton keeps both on disk), so the second one's "prefill 1st" is what a generate() call pays at a new length
    python -m sparseattn.cli bench generate --models 1b --lengths 32k --batches 16 \
      --methods dense,dense-flash,sparse,sparse-evict --json "$out/bench_generate_32k_run${RUN:-1}.json" 2>&1 | tee -a "$log" ;;
  bench-generate-64k)
    timeout ${BENCH_TIMEOUT:-420} python -m sparseattn.cli bench generate --models 1b --lengths 64k --batches 1,8 \
      --methods dense,dense-flash,sparse,sparse-evict --json "$out/bench_generate_64k.json" 2>&1 | tee -a "$log" || true
    timeout ${BENCH135_TIMEOUT:-150} python -m sparseattn.cli bench generate --models 135m --lengths 32k --batches 16 \
      --methods dense,dense-flash,sparse,sparse-evict --json "$out/bench_generate_135m.json" 2>&1 | tee -a "$log" || true ;;
  bench-generate-ceiling)
    timeout ${BENCH_TIMEOUT:-480} python -m sparseattn.cli bench generate --models 1b --lengths 32k,64k --batches 1,8 \
      --methods dense,dense-flash,sparse,sparse-evict --json "$out/bench_generate_ceiling.json" 2>&1 | tee -a "$log" || true
    timeout 90 python benchmarks/prefill_ceiling.py "$out/bench_generate_ceiling.json" 2>&1 | tee -a "$log" || true ;;
  bench-generate-static)
    # the fourteenth round's sparse row hit Dynamo's recompile limit: its log says which guard and where
    # METHODS=dense,sparse leaves out FlexAttention, whose first call compiles for a minute (1,505 tokens/s in the
    # fifteenth round)
    TORCH_LOGS=${TORCH_LOGS:-graph_breaks,recompiles} python -m sparseattn.cli bench generate --models 1b --lengths 32k --batches 16 --caches static --reduce-overhead \
      ${METHODS:+--methods "$METHODS"} --json "$out/bench_generate_static.json" 2>&1 | tee -a "$log" ;;
  profile-compile)
    # BATCHES=padded,padding-free: where the fourteenth round's eager padded (35 ms) and padding-free (33 ms) steps
    # lose to the unpadded one (27 ms) with the same kernels (a read from the GPU per batch?)
    timeout ${PROFILE_TIMEOUT:-540} python benchmarks/profile_model_step.py --length 16k --modes ${MODES:-eager,compile} \
      --batches ${BATCHES:-unpadded} --json "$out/profile_model_step.json" 2>&1 | tee -a "$log" || true ;;
  generate-round)
    # the sixteenth round's generation measurements in one call (about 8 minutes): the static-cache step captured
    # whole (dense and sparse), the dynamic cache with the decode kernel's one variant (sparse, sparse-evict against
    # both dense baselines), and where the sparse decoding step's time goes
    METHODS=${METHODS:-dense,sparse} timeout 200 bash "$0" bench-generate-static || true
    RUN=1 timeout 220 bash "$0" bench-generate-32k || true
    PROFILE_TIMEOUT=150 bash "$0" profile-decode || true ;;
  profile-host)
    timeout ${PROFILE_TIMEOUT:-300} python benchmarks/profile_attention_host.py --json "$out/profile_attention_host.json" \
      2>&1 | tee -a "$log" || true ;;
  eager-floor)
    timeout ${PROFILE_TIMEOUT:-300} python benchmarks/eager_floor.py --length 16k --batches "${BATCHES:-unpadded,padding-free}" \
      --modes "${FLOOR_MODES:-eager,graph}" --variants "${FLOOR_VARIANTS:-dense,sparse,launchless,free}" \
      --json "$out/eager_floor.json" 2>&1 | tee -a "$log" || true ;;
  owed-30)
    # what the thirtieth round left unrun (about 9 minutes): the compiled step's floor (unpadded) beside the eager one
    # and the graph, with the operators' launches taken out and each cell's host time; then the partial tiles' mask
    # cost against flex_mask (sliding, D 128 and 64; its rows print as they come, so its limit cuts only the last)
    FLOOR_MODES=eager,compile,graph BATCHES=unpadded PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-270} bash "$0" eager-floor || true
    partial_tiles "${BENCH_TIMEOUT:-260}" --layouts sliding --head-dims 128,64 || true ;;
  owed-31)
    # the thirty-first round's owed work in one call (about 9 minutes, each part under its own limit): the GPU tests
    # through models since the gradients take their inputs' layout (d84f8de), then the compiled floor with the
    # launchless row and each cell's host time, then the partial tiles' cost at D 128 (its rows as they come)
    SPARSEATTN_TRITON_AUTOTUNE=0 timeout ${TESTS_TIMEOUT:-170} python -m pytest -q -p no:cacheprovider -m gpu \
      -n "${TEST_WORKERS:-8}" tests/test_block_gpu.py tests/test_packed_padded.py \
      -k "compiled_model or tiny_bert or captured or segments or cuda" 2>&1 | tail -15 | tee -a "$log" || true
    FLOOR_MODES=${FLOOR_MODES:-eager,compile} BATCHES=unpadded PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-190} bash "$0" \
      eager-floor || true
    partial_tiles "${BENCH_TIMEOUT:-170}" --layouts sliding --head-dims 128 --methods triton,flex_mask || true ;;
  direct)
    # the kernels' binaries launched directly (triton_launch.DirectLaunch), in one call (about 8 minutes): the GPU tests
    # of every kernel path and the launcher's own, an attention call's host time with and without it (the encoder's
    # plan, split lists), then the 16k encoder step eagerly and compiled with it (sparse) and through the JIT (jit)
    SPARSEATTN_TRITON_AUTOTUNE=0 timeout ${TESTS_TIMEOUT:-200} python -m pytest -q -p no:cacheprovider -m gpu \
      -n "${TEST_WORKERS:-8}" tests/test_block_gpu.py tests/test_packed_padded.py \
      -k "binaries or autotuned or (match_reference and triton) or segments or compiled_model or tiny_bert or captured" \
      2>&1 | tail -15 | tee -a "$log" || true
    timeout ${HOST_TIMEOUT:-100} python benchmarks/profile_attention_host.py --global-tokens 1 --calls 100 \
      --json "$out/profile_attention_host.json" 2>&1 | tee -a "$log" || true
    FLOOR_MODES=eager,compile FLOOR_VARIANTS=dense,sparse,jit BATCHES=unpadded PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-200} \
      bash "$0" eager-floor || true ;;
  compile-order)
    # the thirty-third round's open question (about 5 minutes): is the compiled step slower after a capture in the
    # same process, and do its kernels still launch through their binaries there
    timeout ${BENCH_TIMEOUT:-300} python benchmarks/compile_after_capture.py 2>&1 | grep -E "^  encoder|^after" \
      | tee -a "$log" || true ;;
  owed-h200)
    # the twentieth round's owed H200 numbers in one call (about 9 minutes, each part under its own limit): the eager
    # floor with the cheaper autotuned launches, then the unpadded encoder step in the three modes users run
    PROFILE_TIMEOUT=200 bash "$0" eager-floor || true
    MODES=${MODES:-eager,compile,reduce-overhead} BATCHES=${BATCHES:-unpadded} timeout ${BENCH_TIMEOUT:-330} \
      bash "$0" bench-model || true ;;
  owed-22)
    # what the twenty-second round left owed, in one call (about 9 minutes, each part under its own limit): the
    # kernel against flex_mask with the queued timing (its one H200 cell, 0.98, had the old timing; flex_mask compiles
    # for about 170 s a cell), then the decoder with its cache at 4k and 32k
    timeout ${FLEX_TIMEOUT:-300} python -m sparseattn.cli bench attention --head-dims 64 --lengths 16k --layouts sliding \
      --sparsity 90 --methods dense,dense_packed,flex_mask,triton,backend --json "$out/bench_attention_flex.json" \
      2>&1 | tee -a "$log" || true
    LENGTHS=4k,32k BATCHES=unpadded,packed timeout ${BENCH_TIMEOUT:-240} bash "$0" bench-decoder || true ;;
  split-forward)
    # the twenty-third round's profile: the forward took as long as the dK/dV pass on the padding-free batch and did
    # not shrink with the block density where the split passes did; the global token's row, walked by one program,
    # would set its time. First the tests (the -fwd variants), then A/B in separate processes, each under its limit
    SPARSEATTN_TRITON_AUTOTUNE=0 timeout ${TESTS_TIMEOUT:-200} python -m pytest -q -p no:cacheprovider -m gpu \
      -n "${TEST_WORKERS:-8}" tests/test_block_gpu.py -k "split-fwd" 2>&1 | tail -15 | tee -a "$log" || true
    for sf in 0 1; do
      echo "== SPARSEATTN_TRITON_SPLIT_FORWARD=$sf" | tee -a "$log"
      SPARSEATTN_TRITON_SPLIT_FORWARD=$sf encoder_step ${BENCH_TIMEOUT:-140} "$out/bench_model_split$sf.json" \
        --modes reduce-overhead --batches padding-free,unpadded | grep -E "^(model|encoder) " | tee -a "$log" || true
      SPARSEATTN_TRITON_SPLIT_FORWARD=$sf timeout ${PROFILE_TIMEOUT:-70} python benchmarks/profile_model_step.py \
        --length 16k --modes reduce-overhead --batches padding-free --attention triton \
        --json "$out/profile_split$sf.json" 2>&1 | grep -E "ms/step|_kernel|_merge" | tee -a "$log" || true
    done ;;
  fused-backward)
    # at head size 32 a tile's exponentials weigh more against its matrix products: the two-pass backward computes
    # the probabilities twice (dK/dV pass, dQ pass), the fused one once, adding dQ atomically (fifth round: 0.3 ms
    # a step less, within that round's noise)
    SPARSEATTN_TRITON_AUTOTUNE=0 timeout ${TESTS_TIMEOUT:-120} python -m pytest -q -p no:cacheprovider -m gpu \
      tests/test_packed_padded.py -k "block-fused" 2>&1 | tail -3 | tee -a "$log" || true
    backward_ab "128 64" padding-free,unpadded "${BENCH_TIMEOUT:-110}"
    timeout ${PROFILE_TIMEOUT:-70} python benchmarks/profile_model_step.py --length 16k --modes reduce-overhead \
      --batches padding-free --attention triton --backward fused --json "$out/profile_fused.json" 2>&1 \
      | grep -E "ms/step|_kernel|_merge" | tee -a "$log" || true ;;
  tests-fused)
    # one call where a session has one call's device time: every GPU test, then the padding-free step (the padded
    # target's batch) under reduce-overhead with both backwards, each run under its own limit (a fresh machine's first
    # run compiled for over 70 s in the twenty-fifth round). TILES=64,128: both tiles (the twenty-fifth round timed
    # 128 both ways, 64 only fused)
    TESTS_TIMEOUT=${TESTS_TIMEOUT:-250} TEST_WORKERS=${TEST_WORKERS:-8} bash "$0" gpu-tests || true
    backward_ab "$(tr , ' ' <<< "${TILES:-64}")" padding-free "${BENCH_TIMEOUT:-120}" ;;
  flex-retry)
    # what the twenty-sixth round left: AP's flex_mask (FlexAttention tiles of 64: the default ones ask for more shared
    # memory than Hopper has) and the kernel in one process. Fewer methods than bench attention's default: with five,
    # a fresh machine's compiling and autotuning did not finish in 225 s
    timeout ${FLEX_TIMEOUT:-400} python -m sparseattn.cli bench attention --head-dims 64 --lengths 16k --layouts ap \
      --sparsity 90 --methods dense,flex_mask,triton --kernel-options '{"BLOCK_M": 64, "BLOCK_N": 64}' \
      --json "$out/bench_attention_ap_flex64.json" 2>&1 | tee -a "$log" || true ;;
  queued)
    # issue 24: the encoder step at 16k timed as steps queued back to back (bench model's timing since the
    # twenty-sixth round) and each waited for, under reduce-overhead (MODES), padding-free and unpadded (BATCHES),
    # tiles of 64 then 128 (TILES), each tile in its own process under its own limit
    for bs in $(tr , ' ' <<< "${TILES:-64,128}"); do
      echo "== block size $bs" | tee -a "$log"
      tile=(--block-size "$bs")
      [[ $bs == auto ]] && tile=()  # the backend's own choice by head size
      encoder_step ${BENCH_TIMEOUT:-240} "$out/bench_model_queued_b$bs.json" --modes "${MODES:-reduce-overhead}" \
        --batches "${BATCHES:-padding-free,unpadded}" "${tile[@]}" | tee -a "$log" || true
    done ;;
  split-forward-attention)
    for sf in 0 1; do
      echo "== SPARSEATTN_TRITON_SPLIT_FORWARD=$sf" | tee -a "$log"
      SPARSEATTN_TRITON_SPLIT_FORWARD=$sf timeout ${BENCH_TIMEOUT:-280} python -m sparseattn.cli bench attention \
        --head-dims "${HEAD_DIMS:-64,128}" --lengths 16k --sparsity 90 --methods dense,dense_packed,triton \
        --json "$out/bench_attention_split$sf.json" 2>&1 | tee -a "$log" || true
    done ;;
  decode-sdpa)
    timeout 300 python benchmarks/decode_sdpa_backend.py 2>&1 | tee -a "$log" ;;
  profile-decode)
    timeout ${PROFILE_TIMEOUT:-400} python benchmarks/profile_decode_step.py --length 32k --batch 16 \
      --methods dense-flash,sparse --json "$out/profile_decode_step.json" 2>&1 | tee -a "$log" || true ;;
  profile-prefill)
    timeout ${PROFILE_TIMEOUT:-400} python benchmarks/profile_decode_step.py --length 32k --batch 16 --prefill \
      --steps 2 --methods dense,sparse --json "$out/profile_prefill.json" 2>&1 | tee -a "$log" || true ;;
  lm-study)
    # the database comes back under $OUT; carry it in again (as studies/lm_attention_pruning.sqlite) to resume.
    # The dense checkpoints in its .work/ folder are too large to travel: a resumed call retrains the dense
    # model of a seed whose masked runs are still pending.
    # The 14M-parameter model leaves the GPU mostly idle: several workers share it (WORKERS, default 6).
    OMP_NUM_THREADS=2 GLUE_DIR=.bundle/glue timeout ${LM_TIMEOUT:-540} python -m sparseattn.cli sweep \
      studies/lm_attention_pruning.yaml --workers "${WORKERS:-6}" --gpus 0 2>&1 | tee -a "$log" || true
    cp -r studies/lm_attention_pruning.sqlite* "$out/" ;;
  study-start|lm-study-start)
    # A study's sweep in the background, in its own process session, so that it outlives this call: a machine
    # kept warm by the next call (within the device's idle release) keeps the checkpoints and averages of its
    # work folder, which are too large to travel. Follow it with study-wait, in this call or the next ones.
    # study-start SPEC (studies/NAME.yaml; lm-study-start: the LM study); WORKERS (default 6) share the GPU.
    spec=${2:-studies/lm_attention_pruning.yaml}; name=$(basename "$spec" .yaml)
    mkdir -p "out/$name"
    rm -f "out/$name/pid"
    # the sweep writes its own pid: setsid forks where the caller leads its process group, and $! would be setsid's
    OMP_NUM_THREADS=2 GLUE_DIR=${GLUE_DIR:-.bundle/glue} setsid nohup bash -c 'echo $$ > "$0"; exec "$@"' \
      "out/$name/pid" python -m sparseattn.cli sweep "$spec" --workers "${WORKERS:-6}" --gpus 0 \
      --no-progress > "out/$name/sweep.log" 2>&1 < /dev/null &
    while [[ ! -s "out/$name/pid" ]]; do sleep 0.2; done
    db=$(python -c "import sys; from sparseattn.experiments.sweep import load_spec; print(load_spec(sys.argv[1]).db)" "$spec")
    stat -c %i "$db" > "out/$name/db_inode" 2>/dev/null || true  # the file the sweep works on: study-wait checks it
    echo "$name started in the background (pid $(cat "out/$name/pid"))" | tee -a "$log" ;;
  study-wait|lm-study-wait)
    # until the background study ends or DEADLINE (seconds since the epoch) passes; then a consistent copy of
    # its database and its log to $OUT (carry the database back in where the spec's db says, to resume elsewhere).
    # Carry nothing at the database's path into these calls: it would replace the file under the running sweep
    spec=${2:-studies/lm_attention_pruning.yaml}; name=$(basename "$spec" .yaml)
    pid=$(cat "out/$name/pid")
    db=$(python -c "import sys; from sparseattn.experiments.sweep import load_spec; print(load_spec(sys.argv[1]).db)" "$spec")
    if [[ -s "out/$name/db_inode" && "$(stat -c %i "$db" 2>/dev/null)" != "$(cat "out/$name/db_inode")" ]]; then
      echo "WARNING: $db is not the file the sweep started on (carried into this call?): its workers stop writing" \
        "to it; the results of this call are not the sweep's" | tee -a "$log"
    fi
    while kill -0 "$pid" 2>/dev/null && (( $(date +%s) < ${DEADLINE:-0} )); do sleep 5; done
    kill -0 "$pid" 2>/dev/null && echo "$name still running" | tee -a "$log" || echo "$name ended" | tee -a "$log"
    python -c "import sqlite3, sys; from sparseattn.experiments.sweep import load_spec
sqlite3.connect(load_spec(sys.argv[1]).db).backup(sqlite3.connect(sys.argv[2]))" "$spec" "$out/$name.sqlite"
    cp "out/$name/sweep.log" "$out/$name-sweep.log"
    { grep -cE "(^|\] )finished " "out/$name/sweep.log" || true; } | sed 's/^/runs finished: /' | tee -a "$log" ;;
  *)
    echo "unknown stage $stage; see the header of $0" >&2; exit 2 ;;
esac
