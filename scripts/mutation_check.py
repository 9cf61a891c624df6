"""Mutation check: does the suite notice small deliberate bugs?

For each mutation below (one small bug a user would notice), copies the tree
to a temporary folder, applies the mutation there, runs the tests that cover
it against that copy, and reports whether they failed (caught) or passed
(survived). A developer tool, not part of CI:

    .venv/bin/python scripts/mutation_check.py            # every mutation
    .venv/bin/python scripts/mutation_check.py --list     # names only
    .venv/bin/python scripts/mutation_check.py --only sampler-top-p-ignored --only ...
    .venv/bin/python scripts/mutation_check.py -j 2       # two at a time

A mutation whose `old` snippet is not found exactly once is an error: the list
must follow the code, so it fails loudly instead of testing nothing. After
editing a mutated file, update its snippet here.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info",
                                     "build", "gradwire-checkpoints", "node_modules")
TIMEOUT_S = 900


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str          # relative to the repository root
    old: str | tuple[str, ...]   # each must occur exactly once in the file (a tuple: edits made together)
    new: str | tuple[str, ...]   # the replacement of each old snippet
    tests: tuple[str, ...]   # pytest arguments: files or node ids that should catch it
    bug: str           # what a user would see

    def edits(self) -> list[tuple[str, str]]:
        if isinstance(self.old, str):
            return [(self.old, self.new)]
        return list(zip(self.old, self.new, strict=True))


S = "service/gradwire_server/"
SAMPLER, ENGINE, VALIDATION, SCHEDULER = S + "sampler.py", S + "engine.py", S + "validation.py", S + "scheduler.py"
CHECKPOINTS, SERVICER, OPERATIONS, SERVER = (S + "checkpoints.py", S + "training_servicer.py",
                                             S + "operations.py", S + "server.py")

MUTATIONS = [
    # ---- the six the issue found surviving ------------------------------------------------------
    Mutation("sampler-top-p-ignored", SAMPLER,
             "if any(s.top_p < 1.0 for s in picked):", "if False:",
             ("tests/test_sampling_params.py",), "nucleus sampling silently off"),
    Mutation("sampler-temperature-ignored", SAMPLER,
             "scores = logits[index] / temperature[:, None]", "scores = logits[index]",
             ("tests/test_sampling_params.py",), "every temperature samples at 1.0"),
    Mutation("optim-grad-clip-ignored", ENGINE,
             "        if adam.grad_clip_norm > 0:\n            torch.nn.utils.clip_grads_with_norm_",
             "        if False:\n            torch.nn.utils.clip_grads_with_norm_",
             ("tests/test_optim_exact.py",), "clipping silently off"),
    Mutation("validation-context-length-skipped", VALIDATION,
             "    if n > max_context:\n", "    if False:\n",
             ("tests/test_optim_exact.py",), "a datum longer than the context trains"),
    Mutation("checkpoint-renamed-before-marker", CHECKPOINTS,
             '        _crash_point("before_marker")\n'
             "        (temp / MARKER).write_text(json.dumps(metadata, indent=2))\n"
             '        _crash_point("after_marker")\n'
             "        _fsync(temp / MARKER)\n"
             "        _fsync(temp)\n"
             '        _crash_point("before_rename")\n'
             "        if folder.exists():  # overwrite, or an expired checkpoint (check_new)\n"
             "            _exchange(temp, folder)  # temp now holds the old checkpoint\n"
             "            shutil.rmtree(temp, ignore_errors=True)\n"
             "        else:\n"
             "            _rename_into_place(temp, folder, path)\n",
             '        _crash_point("before_rename")\n'
             "        _rename_into_place(temp, folder, path)\n"
             "        temp = folder\n"
             '        _crash_point("before_marker")\n'
             "        (temp / MARKER).write_text(json.dumps(metadata, indent=2))\n"
             '        _crash_point("after_marker")\n',
             ("tests/test_crash_safety.py",), "a crash mid-save leaves a half checkpoint under the name"),
    Mutation("checkpoint-files-not-fsynced", CHECKPOINTS,
             "        for file in sorted(temp.iterdir()):\n            _fsync(file)\n",
             "        for file in sorted(temp.iterdir()):\n",
             ("tests/test_crash_safety.py",), "after a power cut a listed checkpoint can hold empty files"),
    Mutation("stream-end-count-unchecked", SERVICER,
             "if end.num_datums != received:", "if False:",
             ("tests/test_stream_protocol.py",), "a truncated upload is applied as if complete"),
    # ---- the four the issue found caught --------------------------------------------------------
    Mutation("dro-penalty-sign", S + "losses.py",
             "loss = -((logprobs * inputs[\"advantages\"] - penalty)",
             "loss = -((logprobs * inputs[\"advantages\"] + penalty)",
             ("tests/test_rl_losses.py",), "DRO pushes away from the reference policy"),
    Mutation("stage-without-activating-the-run", ENGINE,
             "            with self.engine.computing(self.run.run_id):\n                loss.backward()",
             "            loss.backward()",
             ("tests/test_custom_loss_fast_path.py", "tests/test_streaming.py", "tests/test_compiled_layers.py"),
             "a gradient lands in the wrong run's adapter (or nowhere); with --compile, a backward that "
             "recomputes the unembedding misses the run's LoRA"),
    Mutation("micro-batch-off-by-one", ENGINE,
             "longest_with * (i - start + 1) > max_tokens", "longest_with * (i - start) > max_tokens",
             ("tests/test_rl_losses.py",), "micro-batches exceed the activation budget"),
    Mutation("held-requests-released-out-of-order", SCHEDULER,
             "job = order.held.pop(order.next_seq)", "job = order.held.pop(max(order.held))",
             ("tests/test_operations.py", "tests/test_checkpoints.py"), "requests run out of call order"),
    # ---- validation ---------------------------------------------------------------------------------
    Mutation("validation-vocab-bound-off-by-one", VALIDATION,
             "outside = (tokens < 0) | (tokens >= vocab_size)", "outside = (tokens < 0) | (tokens > vocab_size)",
             ("tests/test_bad_input.py",), "token id == vocab size reaches the embedding"),
    Mutation("validation-context-boundary", VALIDATION,
             "    if n > max_context:\n", "    if n >= max_context:\n",
             ("tests/test_optim_exact.py",), "a datum of exactly the context is refused"),
    Mutation("validation-nan-weights-accepted", VALIDATION,
             "elif not np.isfinite(array).all():", "elif False:",
             ("tests/test_bad_input.py",), "a NaN weight poisons the weights"),
    Mutation("validation-max-lora-rank-exclusive", VALIDATION,
             "if not 1 <= rank <= MAX_LORA_RANK:", "if not 1 <= rank < MAX_LORA_RANK:",
             ("tests/test_optim_exact.py",), "the advertised largest rank is refused"),
    Mutation("validation-non-text-chunk-unchecked", VALIDATION,
             '        if kind != "encoded_text":\n            violations.append(FieldViolation(f"{where}.model_input[{c}]",',
             '        if kind is None:\n            violations.append(FieldViolation(f"{where}.model_input[{c}]",',
             ("tests/test_stream_protocol.py",), "an image chunk crashes the request (INTERNAL)"),
    # ---- streams ------------------------------------------------------------------------------------
    Mutation("stream-header-not-required", SERVICER,
             'if first is None or not first.HasField("header"):', "if first is None:",
             ("tests/test_stream_protocol.py",), "a headless stream gets a confusing error"),
    Mutation("stream-message-after-end-accepted", SERVICER,
             'if end is not None or kind_set == "header":', 'if kind_set == "header":',
             ("tests/test_stream_protocol.py",), "datums after the end are silently applied"),
    Mutation("stream-empty-accepted", SERVICER,
             "            if received == 0:\n", "            if False:\n",
             ("tests/test_stream_protocol.py",), "an empty stream succeeds doing nothing"),
    Mutation("stream-datum-index-not-offset", SERVICER,
             "info.max_context_length, index_offset=received)", "info.max_context_length, index_offset=0)",
             ("tests/test_stream_protocol.py",
              "tests/test_streaming.py::test_bad_datum_deep_in_a_stream_applies_nothing"),
             "a bad streamed datum is named by its index within one message"),
    Mutation("read-outputs-reordered", S + "output_spool.py",
             "                for entry in self._entries[start:end]]",
             "                for entry in self._entries[start:end][::-1]]",
             ("tests/test_output_spool.py",
              "tests/test_streaming.py::test_dataset_larger_than_64_mib_with_default_limits"),
             "streamed-back logprobs belong to other datums"),
    # ---- scheduler and operations ------------------------------------------------------------------
    Mutation("scheduler-gap-never-expires", SCHEDULER,
             "        if seq_id in order.held and order.next_seq < seq_id:\n",
             "        if False:\n",
             ("tests/test_server_lifecycle.py",), "a lost request wedges its run forever"),
    Mutation("aborted-held-request-runs-when-released", SCHEDULER,
             "            if job.aborted:\n                continue\n", "",
             ("tests/test_operations.py::test_held_requests_behind_a_rejected_one_are_aborted",),
             "an OptimStep aborted while held (ABORTED to its client) runs anyway once the order reaches it"),
    Mutation("aborted-held-requests-block-the-order", SCHEDULER,
             "        for job in order.held.values():\n            if not job.aborted:\n",
             "        for job in [order.held.pop(seq) for seq in sorted(order.held)]:\n            if not job.aborted:\n",
             ("tests/test_operations.py::test_held_requests_behind_a_rejected_one_are_aborted",),
             "after a rejected request aborts the one held behind it, the run's next request waits for the "
             "aborted seq_id, then fails"),
    Mutation("cancel-of-a-request-being-computed-reads-cancelled", SCHEDULER,
             "            if job.stepping:\n                job.cancel_asked = True\n",
             "            if False:\n                job.cancel_asked = True\n",
             ("tests/test_operations.py::test_a_cancel_while_the_request_is_computed_leaves_its_result_standing",),
             "a ForwardBackward cancelled while computed reads CANCELLED, yet its gradient was added"),
    Mutation("cancel-during-a-turn-forgotten", SCHEDULER,
             "                cancelled_now = job.cancel_asked and not step.done\n",
             "                cancelled_now = False\n",
             ("tests/test_operations.py::test_a_cancelled_stream_applies_nothing_and_its_run_goes_on",),
             "a stream cancelled while a piece is computed goes on and is applied"),
    Mutation("cancelled-stream-left-parked", SCHEDULER,
             "            self._unpark(job.run_id)  # a parked run's cancelled head is dropped at its turn\n",
             "",
             ("tests/test_operations.py::test_a_cancelled_stream_applies_nothing_and_its_run_goes_on",),
             "after a stream waiting for input is cancelled, the run's next OptimStep never runs"),
    Mutation("deleted-checkpoint-reads-as-damaged", S + "checkpoints.py",
             "    except FileNotFoundError:\n        check_unchanged(checkpoint)\n",
             "    except FileNotFoundError:\n",
             ("tests/test_batched_sampling.py::test_a_sampler_checkpoint_changed_while_its_requests_wait_is_not_called_damaged",),
             "a checkpoint deleted while a Sample naming it waited reads DATA_LOSS, as if damaged"),
    Mutation("replaced-checkpoint-reads-as-damaged", S + "checkpoints.py",
             "    if _sha256(handle) != expected[\"sha256\"]:\n        check_unchanged(checkpoint)\n",
             "    if _sha256(handle) != expected[\"sha256\"]:\n",
             ("tests/test_batched_sampling.py::test_a_sampler_checkpoint_changed_while_its_requests_wait_is_not_called_damaged",),
             "a checkpoint saved again while a Sample naming it waited reads DATA_LOSS, as if damaged"),
    Mutation("sampling-request-id-unbounded", S + "sampling_servicer.py",
             "            validation.request_id(request.request_id)\n", "            pass\n",
             ("tests/test_bad_input_table.py::test_a_sampling_request_id_over_the_limit_is_refused",),
             "a Sample with a 3 MiB request_id is accepted and the id kept in memory"),
    Mutation("stop-strings-unbounded", S + "sampling_validation.py",
             "    if len(strings) > MAX_STOP_STRINGS:\n", "    if False:\n",
             ("tests/test_sampling.py::test_bad_sample_is_rejected_and_changes_nothing",),
             "60,000 stop strings slow every other request's decode steps"),
    Mutation("kv-oversize-request-accepted", S + "sampling_servicer.py",
             "            sampling_validation.check_kv_budget(", "            (lambda *args: None)(",
             ("tests/test_batched_sampling.py::test_a_request_larger_than_the_whole_cache_is_refused_and_changes_nothing",),
             "a request that can never fit the KV cache is accepted and waits forever"),
    Mutation("kv-oversize-field-always-max-tokens", S + "sampling_validation.py",
             "    elif spec.worst_case_blocks(num_samples=1) <= usable_blocks:\n",
             "    elif False:\n",
             ("tests/test_batched_sampling.py::test_a_request_larger_than_the_whole_cache_is_refused_and_changes_nothing",),
             "a request with too many samples is told to cut max_tokens"),
    Mutation("custom-loss-made-without-the-logprobs-accepted", "sdk/gradwire/custom_loss.py",
             "    if all(leaf.grad is None for leaf in leaves):", "    if False:",
             ("tests/test_custom_loss.py::test_bad_custom_loss_raises_and_changes_nothing",),
             "a loss of torch.tensor(1.0, requires_grad=True) is accepted and applies a zero gradient"),
    Mutation("retry-of-another-rpc-gets-the-first-operation", SCHEDULER,
             "        if first_kind != kind:\n", "        if False:\n",
             ("tests/test_operations.py::test_retry_with_same_request_id_is_the_same_operation",),
             "an OptimStep sent with a ForwardBackward's seq_id and request_id gets its operation and never runs"),
    Mutation("oversize-generation-blocks-the-loop", SAMPLER,
             "            if need > self.pool.usable_blocks:  # never admitted", "            if False:  # never admitted",
             ("tests/test_batched_sampling.py::test_a_generation_larger_than_the_cache_given_to_the_loop_fails_and_blocks_nothing",),
             "a generation larger than the KV cache, added to the loop directly, blocks every request behind it"),
    Mutation("oversize-prompt-blamed-on-max-tokens", S + "sampling_validation.py",
             "    if not spec.num_samples or blocks_for(length + 1) > usable_blocks:",
             "    if not spec.num_samples:",
             ("tests/test_batched_sampling.py::test_a_request_larger_than_the_whole_cache_is_refused_and_changes_nothing",),
             "a sample whose prompt alone exceeds the KV cache is told to cut max_tokens"),
    Mutation("deleted-operation-leaves-its-waiters-waiting", OPERATIONS,
             "        record.deleted = True\n", "",
             ("tests/test_operations.py::test_deleting_an_operation_ends_its_waiters_and_readers_with_not_found",),
             "a ReadOutputs or WaitOperation on an operation deleted meanwhile hangs or reads as unfinished"),
    Mutation("download-not-retried", "sdk/gradwire/rest_client.py",
             "            written, announced = transport.retrying(download)", "            written, announced = download()",
             ("tests/test_operations.py::test_a_download_started_while_the_server_restarts_gets_through",),
             "a download_checkpoint started while the server restarts fails at once"),
    Mutation("list-operations-name-a-raw-prefix", OPERATIONS,
             "        names = [name for name in self.store.names(collection + \"/\")",
             "        names = [name for name in self.store.names(request.name)",
             ("tests/test_operations.py::test_cancel_list_and_delete",),
             "ListOperations of one run's collection lists another run's operations whose id it prefixes"),
    Mutation("lost-index-runs-not-rebuilt", S + "run_index.py",
             "            if self.get_run(run.run_id) is None:\n                self._insert_run(run)\n",
             "            if False:\n                self._insert_run(run)\n",
             ("tests/test_resources.py::test_a_lost_run_index_is_rebuilt_from_the_checkpoint_folders",),
             "after the run index is lost, runs with checkpoints on disk are never listed again"),
    Mutation("page-token-repeats-the-last-item", S + "run_index.py",
             '            conditions.append("(created_time, path) > (?, ?)")',
             '            conditions.append("(created_time, path) >= (?, ?)")',
             ("tests/test_resources.py::test_deleting_what_a_page_listed_skips_nothing_on_the_next_page",
              "tests/test_resources.py::test_list_checkpoints_pages"),
             "each page of checkpoints repeats the previous page's last one"),
    Mutation("page-token-of-any-list-accepted", S + "paging.py",
             'decoded.get("list") == listing and', "",
             ("tests/test_resources.py::test_deleting_what_a_page_listed_skips_nothing_on_the_next_page",),
             "a page token of one run's checkpoints pages another run's, or the training runs"),
    Mutation("scheduler-skipped-seq-id-accepted", SCHEDULER,
             "        if seq_id < order.next_seq:\n            raise aborted(",
             "        if False:\n            raise aborted(",
             ("tests/test_server_lifecycle.py",), "a late request is held forever instead of ABORTED"),
    Mutation("scheduler-rejected-request-does-not-abort-held", SCHEDULER,
             "                self._abort_held(order, aborted(why))",
             "                pass",
             ("tests/test_operations.py",), "an optim_step runs without the gradient meant for it"),
    Mutation("scheduler-failure-does-not-abort-queued", SCHEDULER,
             "            if not job.cancelled:  # a cancelled one is finished already\n",
             "            if False:\n",
             ("tests/test_checkpoint_bad_input.py::test_a_failed_load_aborts_the_requests_queued_behind_it",),
             "requests queued behind a failed one never finish"),
    Mutation("retry-runs-again", SCHEDULER,
             "if order is None or seq_id == 0 or seq_id not in order.op_of_seq:",
             "if order is None or seq_id == 0 or seq_id in order.op_of_seq:",
             ("tests/test_operations.py",), "a retried request runs twice"),
    Mutation("operations-never-expire", OPERATIONS,
             "if r.finished_at is not None and r.finished_at < cutoff]", "if False]",
             ("tests/test_server_lifecycle.py",), "server memory grows with every finished operation"),
    # The cap is applied twice since the merge: when the request's timeout is read, and by the store.
    Mutation("operations-wait-uncapped", OPERATIONS,
             ("min(timeout_s, self.max_wait_s)", "    return min(seconds + nanos / 1e9, cap_s)\n"),
             ("timeout_s", "    return seconds + nanos / 1e9\n"),
             ("tests/test_server_lifecycle.py",), "a long-poll holds a connection past the advertised cap"),
    Mutation("optim-weight-decay-ignored", ENGINE,
             "weight_decay=adam.weight_decay)", "weight_decay=0.0)",
             ("tests/test_training.py::test_optim_step_matches_torch_adamw",), "weight_decay silently off"),
    Mutation("cross-entropy-weights-ignored", S + "losses.py",
             'weights = inputs.get("weights", inputs["mask"])', 'weights = inputs["mask"]',
             ("tests/test_training.py",), "every token weighs 1 whatever the weights say"),
    Mutation("non-finite-step-keeps-its-moments", ENGINE,
             "                tensor.copy_(values)\n", "                pass\n",
             ("tests/test_bad_input_table.py::test_a_refused_later_step_keeps_the_moments_and_the_finite_gradients",),
             "a refused step still moves AdamW's moments: the next steps differ from a run that never tried it"),
    Mutation("refused-first-step-leaves-moments", ENGINE,
             "            run.drop_unhomed_state()  # this step made it", "            pass",
             ("tests/test_bad_input_table.py::test_a_refused_first_step_leaves_the_optimizer_as_new",),
             "after a refused first step, AdamW starts from the refused step's moments"),
    Mutation("refused-step-keeps-its-hyperparameters", ENGINE,
             "                group.update(kept)", "                pass",
             ("tests/test_bad_input_table.py::test_a_refused_first_step_leaves_the_optimizer_as_new",),
             "a refused step's learning rate stays in the optimizer (and its next checkpoint)"),
    Mutation("optim-grad-norm-l1", ENGINE,
             "grad_norm = torch.nn.utils.get_total_norm(grads, foreach=foreach)",
             "grad_norm = torch.nn.utils.get_total_norm(grads, norm_type=1.0, foreach=foreach)",
             ("tests/test_optim_exact.py",), "grad_norm:mean reports another number"),
    Mutation("activation-checkpointing-never-active", ENGINE,
             "            module.train()  # transformers checkpoints a layer only in training mode", "            pass",
             ("tests/test_activation_checkpointing.py",),
             "--activation-checkpointing saves no memory: layers keep their activations as before"),
    Mutation("compiled-layers-never-compiled", S + "compiled_layers.py",
             "            if not self.active:", "            if True:",
             ("tests/test_compiled_layers.py",), "--compile trains as fast as without it: nothing is compiled"),
    Mutation("compiled-layers-compile-per-rank", S + "compiled_layers.py",
             '    "force_parameter_static_shapes": False,', '    "force_parameter_static_shapes": True,',
             ("tests/test_compiled_layers.py",),
             "each run of a new rank compiles again (a minute on a GPU), then runs eagerly past the limit"),
    Mutation("compiled-layers-other-runs-layers-left-on", S + "compiled_layers.py",
             "        with adapter_layers_off(self.lora_layers):",
             "        with adapter_layers_off([x for x in self.lora_layers\n"
             "                                 if any(x.get_base_layer() is linear for linear, _ in adapted)]):",
             ("tests/test_compiled_layers.py",),
             "runs adapting other modules than their neighbours compile again each (peft reads the run's name)"),
    Mutation("compiled-layers-sampler-adapters-left-on", S + "sampler_weights.py",
             "                engine.adapters_changed()", "                pass",
             ("tests/test_compiled_layers.py",),
             "after the sampler loads an adapter onto modules no run adapts, every run compiles again"),
    Mutation("compiled-probe-of-one-sequence", ENGINE,
             '    return [DatumArrays(sequence, {"target_tokens": sequence})] * 2',
             '    return [DatumArrays(sequence, {"target_tokens": sequence})]',
             ("tests/test_compiled_layers.py",),
             "with --compile the first training request waits for a compile (startup compiled batch-1 graphs)"),
    Mutation("startup-off-the-worker", SERVER,
             'await self.scheduler.run_on_worker(\n                "startup", lambda: self._load(device))',
             'await asyncio.to_thread(self._load, device)',
             ("tests/test_server_lifecycle.py",),
             "the model loads in another thread than the worker: on a CPU host its OpenMP team slows the worker"),
    Mutation("compiled-warm-up-without-the-no-grad-pass", ENGINE,
             "            self.micro_batch_logprobs(run, _two_sequences(length))",
             "            pass",
             ("tests/test_compiled_layers.py",),
             "with --compile a first forward (no gradients) waits for a compile"),
    Mutation("compiled-warm-up-without-the-grad-pass", ENGINE,
             "        self.activation_bytes_per_token(2 * length)",
             "        pass",
             ("tests/test_compiled_layers.py",),
             "with --compile and no startup probe (sizes set by flags) a first forward_backward waits for a compile"),
    Mutation("compiled-layers-round-in-float32", S + "compiled_layers.py",
             'INDUCTOR_OPTIONS = {"emulate_precision_casts": True}',
             'INDUCTOR_OPTIONS = {"emulate_precision_casts": False}',
             ("tests/test_compiled_layers.py",),
             "with --compile and a bf16 base, training's logprobs drift from the eager sampler's"),
    Mutation("startup-failure-as-a-traceback", S + "cli.py",
             '        sys.exit(f"gradwire-server: {str(error).splitlines()[0]}")',
             "        raise",
             ("tests/test_server_lifecycle.py",),
             "a server that cannot start prints a traceback instead of the flag and the cause"),
    Mutation("compile-failure-not-named", SERVER,
             "        except torch._dynamo.exc.BackendCompilerFailed as error:",
             "        except ZeroDivisionError as error:",
             ("tests/test_server_lifecycle.py",),
             "--compile without a working compiler fails with inductor's traceback"),
    Mutation("missing-model-folder-taken-for-a-hub-id", S + "models.py",
             "        if written_as_path and not pathlib.Path(name_or_path).is_dir():",
             "        if False:",
             ("tests/test_server_lifecycle.py",),
             "--model /a/missing/folder answers with the hub's repo-id rules"),
    Mutation("port-shared-with-another-server", SERVER,
             '            ("grpc.so_reuseport", 0)])',
             "            ])",
             ("tests/test_server_lifecycle.py",),
             "a second server on a port in use starts, and the kernel splits clients between the two"),
    Mutation("port-in-use-as-a-traceback", SERVER,
             "        except RuntimeError as error:  # gRPC's log line above it gives the cause",
             "        except ZeroDivisionError as error:",
             ("tests/test_server_lifecycle.py",),
             "a port in use ends the server with grpc's traceback instead of naming --port"),
    Mutation("checkpoint-dir-shared-with-another-server", SERVER,
             "            self.folder_lock = FolderLock(self.checkpoint_root)  # before anything in the folder is touched",
             "            pass",
             ("tests/test_server_lifecycle.py::test_a_second_server_on_a_checkpoint_dir_in_use_refuses_to_start",),
             "a second server on a checkpoint folder in use starts, unloads the first's runs, deletes its saves"),
    Mutation("checkpoint-dir-failure-as-a-traceback", SERVER,
             "        except (FolderInUse, OSError, sqlite3.DatabaseError) as error:",
             "        except FolderInUse as error:",
             ("tests/test_server_lifecycle.py",),
             "a --checkpoint-dir that is a file, unwritable or with a damaged index ends in a traceback"),
    Mutation("kv-cache-allocation-failure-as-a-traceback", SERVER,
             "        except RuntimeError as error:  # torch.OutOfMemoryError on CUDA, the allocator's RuntimeError on the CPU",
             "        except ZeroDivisionError as error:",
             ("tests/test_server_lifecycle.py",),
             "--kv-cache-mb larger than the machine ends in the allocator's traceback"),
    Mutation("port-out-of-range-wrapped", S + "cli.py",
             "    if not text.isdigit() or int(text) > 65535:", "    if not text.lstrip('-').isdigit():",
             ("tests/test_server_lifecycle.py::test_cli_flags_are_parsed_into_the_config",),
             "--port 70000 serves on port 4464"),
    Mutation("negative-budgets-accepted", S + "cli.py",
             "        if not math.isfinite(value) or value < 0 or (minimum_exclusive and value == 0) or value > MAX_MEGABYTES:",
             "        if False:",
             ("tests/test_server_lifecycle.py::test_cli_flags_are_parsed_into_the_config",),
             "--keep-graph-budget-mb -100 is used as a budget; --kv-cache-mb nan ends in a traceback"),
    Mutation("checkpoint-disk-failure-internal", S + "checkpoint_ops.py",
             "        except OSError as error:  # the disk's state",
             "        except ZeroDivisionError as error:  # the disk's state",
             ("tests/test_checkpoint_bad_input.py",),
             "a save to a full or read-only disk is INTERNAL (a server bug) with a traceback in the log"),
    Mutation("ipv6-host-without-brackets", SERVER,
             '    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"',
             '    return f"{host}:{port}"',
             ("tests/test_server_lifecycle.py::test_cli_flags_are_parsed_into_the_config",),
             "--host ::1 is refused as a misformatted domain name"),
    Mutation("serving-after-a-stop-during-the-load", SERVER,
             "    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)",
             "    await starting",
             ("tests/test_server_lifecycle.py::test_a_stop_while_the_model_loads_never_serves",),
             "SIGTERM while the model loads: the server turns SERVING and says it listens, then stops"),
    Mutation("second-signal-waits", SERVER,
             "        if stop.is_set():  # os._exit", "        if False:  # os._exit",
             ("tests/test_server_lifecycle.py::test_a_second_signal_exits_at_once_without_draining",),
             "Ctrl-C twice during an 8B model's load still waits minutes for the load"),
    Mutation("stop-leaves-queued-requests-unanswered", SERVER,
             "            await asyncio.to_thread(self.scheduler.drain)",
             "            await asyncio.to_thread(self.scheduler.stop)",
             ("tests/test_server_lifecycle.py::test_sigterm_fails_what_did_not_run_then_exits_cleanly",),
             "after SIGTERM, clients waiting on queued requests get a dropped connection, not what did not run"),
    Mutation("non-finite-gradient-added", ENGINE,
             "        if finite and not values[0]:", "        if False:",
             ("tests/test_bad_input_table.py",),
             "one batch with an inf loss makes the next step fail and discard every gradient accumulated before it"),
    Mutation("seq-id-reuse-without-request-id-taken-for-a-retry", SCHEDULER,
             "        if not request_id or first_request_id != request_id:",
             "        if request_id and first_request_id != request_id:",
             ("tests/test_operations.py",),
             "an OptimStep sent with a taken seq_id and no request_id gets a ForwardBackward's operation and never runs"),
    Mutation("list-operations-filter-ignored", OPERATIONS,
             "                 and (done is None or self.store.get(name).operation.done == done)][:size + 1]",
             "                 ][:size + 1]",
             ("tests/test_operations.py::test_cancel_list_and_delete",),
             "ListOperations(filter=\"done=false\") lists finished operations too"),
    Mutation("clip-fraction-counts-prompt-positions", S + "losses.py",
             '    trained = inputs["mask"] * (inputs["advantages"] != 0)', '    trained = inputs["mask"]',
             ("tests/test_rl_losses.py",),
             "an on-policy PPO batch reports clip_fraction ~0.5: the prompt's positions count as clipped"),
    Mutation("compiled-warm-up-not-called", SERVER,
             "            self.engine.warm_up_compiled_layers()",
             "            pass",
             ("tests/test_compiled_layers.py",),
             "with --compile a first forward (no gradients) waits for a compile, whatever the probe compiled"),
    Mutation("cpu-micro-batches-not-sized-by-the-probe", S + "memory.py",
             "    tokens = CPU_ACTIVATION_BYTES // max(1, bytes_per_token) // 256 * 256",
             "    tokens = CPU_MICRO_BATCH_TOKENS",
             ("tests/test_memory.py",),
             "a larger model's CPU micro-batches hold 16,384 tokens of activations (GBs, and slower)"),
    Mutation("probe-leaves-peft-wrappers", ENGINE,
             "            if not wrapped:",
             "            if False:",
             ("tests/test_memory.py",),
             "after the startup probe the base model samples through peft's wrappers (slower)"),
    Mutation("stream-rpc-outlives-its-aborted-job", SERVICER,
             "            while (message := await _until_done(anext(request_iterator, None), record)) is not None:",
             "            while (message := await anext(request_iterator, None)) is not None:",
             ("tests/test_wedge.py",),
             "a stream whose job an earlier failure aborted waits for its stalled client instead of answering"),
    Mutation("compiled-layers-lora-scale-dropped", S + "compiled_layers.py",
             "return output + ((inputs[0].to(a.dtype) @ a.T) @ b.T) * scale",
             "return output + ((inputs[0].to(a.dtype) @ a.T) @ b.T)",
             ("tests/test_compiled_layers.py",), "--compile trains a differently scaled adapter than it saves"),
    Mutation("smollm2-rotary-frequencies-left-behind", S + "models.py",
             "            setattr(model.get_submodule(module_name), buffer_name, buffer)", "            pass",
             ("tests/test_models.py",), "the packaged pretrained model no longer loads"),
    # ---- checkpoints ------------------------------------------------------------------------------
    Mutation("checkpoint-format-version-unchecked", CHECKPOINTS,
             'if metadata.get("format_version") != FORMAT_VERSION:', "if False:",
             ("tests/test_checkpoint_format.py",), "a newer format is misread"),
    Mutation("checkpoint-moved-folder-accepted", CHECKPOINTS,
             '    if (metadata.get("run_id"), metadata.get("kind"), metadata.get("name")) != \\\n',
             '    if False and (metadata.get("run_id"), metadata.get("kind"), metadata.get("name")) != \\\n',
             ("tests/test_checkpoint_format.py",), "a path serves another checkpoint's weights"),
    Mutation("checkpoint-sha256-unchecked", CHECKPOINTS,
             'if _sha256(handle) != expected["sha256"]:', "if False:",
             ("tests/test_checkpoint_bad_input.py",), "a damaged adapter loads silently"),
    Mutation("checkpoint-failed-save-leaves-temp", CHECKPOINTS,
             "    except BaseException:\n        shutil.rmtree(temp, ignore_errors=True)\n        raise\n",
             "    except BaseException:\n        raise\n",
             ("tests/test_checkpoint_format.py",), "failed saves pile up hidden folders"),
    Mutation("checkpoint-leftovers-kept-at-start", SERVER,
             "            checkpoints.remove_leftovers(self.checkpoint_root)\n", "",
             ("tests/test_crash_safety.py",), "crash leftovers fill the disk"),
    # ---- sampler -------------------------------------------------------------------------------------
    Mutation("sampler-top-k-ignored", SAMPLER,
             "if min(top_k) < vocab:", "if False:",
             ("tests/test_sampling_params.py",), "top_k silently off"),
    Mutation("sampler-nucleus-too-wide", SAMPLER,
             "mass_before >= top_p", "mass_before >= top_p + 0.1",
             ("tests/test_sampling_params.py",), "top_p keeps more tokens than asked"),
    Mutation("sampler-tempered-logprobs", SAMPLER,
             "        all_logprobs = torch.log_softmax(self._logits, dim=-1)\n",
             "        all_logprobs = torch.log_softmax(self._logits / torch.tensor(\n"
             "            [max(g.settings.temperature, 1e-6) for g, _ in self._rows], device=self._logits.device)[:, None],\n"
             "            dim=-1)\n",
             ("tests/test_sampling.py",), "RL importance ratios compare the wrong logprobs"),
    Mutation("sampler-stop-tokens-ignored", SAMPLER,
             "if token in self.settings.stop_tokens or self._hit_stop_string(",
             "if self._hit_stop_string(",
             ("tests/test_sampling.py::test_stop_token_stop_string_and_length",), "stop tokens never stop a sample"),
    # ---- codec, SDK, CLI, server --------------------------------------------------------------------
    Mutation("codec-token-bytes-unchecked", "sdk/gradwire/v1/codec.py",
             "    if len(chunk.tokens) % 4:\n", "    if False:\n",
             ("tests/test_stream_protocol.py",), "a malformed token chunk crashes the request (INTERNAL)"),
    Mutation("codec-shape-unchecked", "sdk/gradwire/v1/codec.py",
             "if any(d < 0 for d in shape) or int(np.prod(shape, dtype=np.int64)) != flat.size:",
             "if any(d < 0 for d in shape):",
             ("tests/test_bad_input.py",), "a tensor whose bytes do not fill its shape is an INTERNAL error"),
    Mutation("sdk-surrogate-loss-misreported", "sdk/gradwire/client.py",
             '"surrogate_loss:sum": output.metrics["loss:sum"]', '"surrogate_loss:sum": loss',
             ("tests/test_custom_loss.py",), "surrogate_loss:sum repeats the loss"),
    Mutation("sdk-base-url-env-ignored", "sdk/gradwire/client.py",
             'target = _grpc_target(base_url or os.environ.get("GRADWIRE_BASE_URL") or DEFAULT_BASE_URL)',
             "target = _grpc_target(base_url or DEFAULT_BASE_URL)",
             ("tests/test_server_lifecycle.py",), "$GRADWIRE_BASE_URL is ignored"),
    Mutation("sdk-seq-id-taken-before-the-message-is-whole", "sdk/gradwire/client.py",
             "            request = _convert.message(request_type, model_id=model_id, request_id=request_id(), **fields)\n"
             "            request.seq_id = next_seq()",
             "            seq_id = next_seq()\n"
             "            request = _convert.message(request_type, model_id=model_id, request_id=request_id(), **fields)\n"
             "            request.seq_id = seq_id",
             ("tests/test_server_lifecycle.py::test_a_request_the_sdk_refuses_takes_no_seq_id",),
             "a save_state(123) leaves a seq_id gap: the run's next request waits 60 s and is ABORTED"),
    Mutation("sdk-loss-fn-config-unchecked", "sdk/gradwire/client.py",
             "        config = _convert.loss_fn_config(loss_fn_config)", "        config = loss_fn_config or {}",
             ("tests/test_server_lifecycle.py::test_a_request_the_sdk_refuses_takes_no_seq_id",),
             "a loss_fn_config value that is not a number fails without naming its key"),
    Mutation("sdk-token-ids-wrapped-to-int32", "sdk/gradwire/v1/codec.py",
             "    if outside.any():", "    if False:",
             ("tests/test_types.py",), "token id 2**32 + 8 silently trains token 8"),
    Mutation("sdk-token-ids-truncated", "sdk/gradwire/types.py",
             "        return operator.index(value)", "        return int(value)",
             ("tests/test_types.py",), "ModelInput.from_ints([5, 6.7]) silently reads token 6"),
    Mutation("sdk-int64-inputs-truncated", "sdk/gradwire/types.py",
             "        if exact.all():", "        if True:",
             ("tests/test_types.py",), "target_tokens of 8.9 silently train token 8"),
    Mutation("sdk-future-timeout-ignored-behind-another-waiter", "sdk/gradwire/futures.py",
             "        if not concurrent.futures.wait([self], timeout).done:",
             "        if not concurrent.futures.wait([self]).done:",
             ("tests/test_types.py",), "result(timeout=0.5) blocks for as long as another thread's wait"),
    Mutation("sdk-closed-client-raw-errors", "sdk/gradwire/_transport.py",
             "        if self.closed:", "        if False:",
             ("tests/test_server_lifecycle.py::test_a_closed_client_says_so",),
             "calls after close() raise grpc's bare ValueError or the executor's RuntimeError"),
    Mutation("sdk-cancelled-wait-cancels-the-send", "sdk/gradwire/_transport.py",
             "        await asyncio.shield(asyncio.wrap_future(future._submitted))",
             "        await asyncio.wrap_future(future._submitted)",
             ("tests/test_training.py::test_a_cancelled_wait_for_an_async_call_leaves_the_client_working",),
             "a task cancelled while awaiting optim_step_async silently drops the step"),
    Mutation("sdk-send-thread-never-ends", "sdk/gradwire/client.py",
             "                    if self._queue.empty():", "                    if False:",
             ("tests/test_training.py::test_a_training_client_holds_no_thread_once_idle",),
             "each training client keeps a thread for the life of the process"),
    Mutation("sdk-async-stream-closed-under-its-reader", "sdk/gradwire/sampling_client.py",
             "            # that next() then ends with the call.\n            call.cancel()",
             "            # that next() then ends with the call.\n            pieces.close()",
             ("tests/test_sampling.py::test_cancelling_an_async_stream_ends_it_on_the_server",),
             "cancelling a task reading sample_stream_async raises 'generator already executing', "
             "and the server keeps generating"),
    Mutation("cli-keep-graph-budget-dropped", S + "cli.py",
             "                        keep_graph_budget_mb=args.keep_graph_budget_mb,\n", "",
             ("tests/test_server_lifecycle.py",), "--keep-graph-budget-mb has no effect"),
    Mutation("server-serving-while-loading", SERVER,
             "        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)\n"
             "        host, port = ",
             "        await self._set_health(health_pb2.HealthCheckResponse.SERVING)\n"
             "        host, port = ",
             ("tests/test_server_lifecycle.py",), "load balancers route to a server still loading"),
    Mutation("server-sigterm-not-handled", SERVER,
             "    for sig in (signal.SIGTERM, signal.SIGINT):", "    for sig in (signal.SIGINT,):",
             ("tests/test_server_lifecycle.py",), "SIGTERM kills in-flight requests"),
    # ---- batched sampler, interceptor, input limits, GSPO (issues 9-12) ----------------------------
    Mutation("kv-block-never-freed", S + "kv_cache.py",
             "            if self._holders[block] == 0:\n                self._free.append(block)\n",
             "            if False:\n                self._free.append(block)\n",
             ("tests/test_batched_sampling.py::test_kv_use_is_visible_and_freed_on_cancel",
              "tests/test_batched_sampling.py::test_the_loop_on_either_attention_implementation_equals_the_reference"),
             "the KV cache leaks until every sampling request waits forever"),
    Mutation("kv-shared-block-freed-while-held", S + "kv_cache.py",
             "    def share(self, block: int) -> None:\n        self._holders[block] += 1\n",
             "    def share(self, block: int) -> None:\n        pass\n",
             ("tests/test_batched_sampling.py",),
             "a prompt block the samples still read is handed out again: samples see another prompt"),
    Mutation("refused-step-keeps-non-finite-gradients", S + "engine.py",
             "                run.clear_gradient()\n                outcome = (",
             "                outcome = (",
             ("tests/test_bad_input_table.py::test_a_refused_first_step_leaves_the_optimizer_as_new",),
             "one overflowing batch wedges the run: every later optim_step is refused"),
    Mutation("prefill-rows-padded-on-the-right", S + "sampler.py",
             "tokens[row, width - count:] = ", "tokens[row, :count] = ",
             ("tests/test_batched_sampling.py::test_the_loop_on_either_attention_implementation_equals_the_reference",
              "tests/test_decode_graphs.py"),
             "a shorter prompt prefilled beside a longer one is read as padding"),
    Mutation("arrivals-wait-for-the-next-turn", S + "sampler.py",
             "while steps < DECODE_STEPS_PER_TURN and not self._arrivals:", "while steps < DECODE_STEPS_PER_TURN:",
             ("tests/test_batched_sampling.py::test_a_request_arriving_mid_turn_joins_at_the_next_decode_step",),
             "a request that arrives while others decode waits up to a whole turn to join"),
    Mutation("finished-task-joins-again", S + "sampling_task.py",
             "        if self._joined or self._discarded:\n", "        if self._generation is not None or self._discarded:\n",
             ("tests/test_batched_sampling.py::test_a_sample_task_joins_the_loop_once",),
             "a late arrival of a finished request generates it again for nobody"),
    Mutation("arrival-join-error-lost", S + "sampling_task.py",
             "        if self._join_error is not None:  # from this step's join, or an arrival's\n",
             "        if self._join_error is not None and self._generation is not None:\n",
             ("tests/test_batched_sampling.py::test_a_request_that_fails_to_join_mid_turn_gets_its_own_error",),
             "a request whose checkpoint fails to load while others decode gets INTERNAL, not its error"),
    Mutation("prefill-padding-not-counted", S + "sampler.py",
             "(len(batch) + 1) * max(width, count) > limit", "len(batch) + 1 > PREFILL_ROWS",
             ("tests/test_batched_sampling.py::test_a_prefill_pass_costs_at_most_its_budget_padding_included",),
             "one long prompt pads a whole batch of short ones: the running batch stalls"),
    Mutation("decode-graph-factors-never-reloaded", S + "decode_graphs.py",
             "        if self._loaded.get(slot) is stack:\n", "        if slot in self._loaded:\n",
             ("tests/test_decode_graphs.py::test_the_next_adapter_in_the_same_bucket_gets_its_own_factors",),
             "a bucketed decode step keeps the previous adapters' LoRA factors: samples use another run's weights"),
    Mutation("decode-graph-row-mask-stale", S + "decode_graphs.py",
             "            bucket.mask[:rows, :, :stack.rank] = stack.mask(adapters)\n", "",
             ("tests/test_decode_graphs.py",),
             "bucketed decode steps apply no row's adapter"),
    Mutation("kv-scratch-block-handed-out", S + "kv_cache.py",
             "range(self.num_blocks - 1, SCRATCH_BLOCK, -1)", "range(self.num_blocks - 1, 0, -1)",
             ("tests/test_decode_graphs.py::test_the_scratch_block_is_never_handed_out",),
             "padding rows of a bucketed step overwrite a sequence's keys and values"),
    Mutation("lora-row-uses-adapter-0", S + "lora_batch.py",
             "return torch.tensor([index[id(w)] if w is not None else -1 for w in rows])",
             "return torch.tensor([0 if w is not None else -1 for w in rows])",
             ("tests/test_batched_sampling.py::test_rows_of_different_adapters_match_their_references",),
             "a sample decodes with another request's adapter"),
    Mutation("malformed-message-answers-unknown", S + "malformed.py",
             "            return Undecodable(name, error)\n", "            raise\n",
             ("tests/test_bad_input_table.py::test_undecodable_message_on_every_method",),
             "undecodable bytes get UNKNOWN instead of INVALID_ARGUMENT naming the message type"),
    Mutation("validation-decoded-size-cap-skipped", VALIDATION,
             "MAX_DATUM_INPUT_BYTES = 64 * 2**20    # all loss_fn_inputs of one datum\n"
             "MAX_REQUEST_INPUT_BYTES = 256 * 2**20 ",
             "MAX_DATUM_INPUT_BYTES = 2**80    # all loss_fn_inputs of one datum\n"
             "MAX_REQUEST_INPUT_BYTES = 2**80 ",
             ("tests/test_bad_input_table.py::test_bad_target_tensor",),
             "a sparse tensor of a few bytes makes the server try to allocate terabytes"),
    Mutation("gspo-ratio-sum-not-mean", S + "losses.py",
             "dim=(1, 2), keepdim=True) / tokens)", "dim=(1, 2), keepdim=True))",
             ("tests/test_rl_losses.py::test_gspo_loss_and_gradient_match_a_per_sequence_loop",
              "tests/test_rl_losses.py::test_gspo_datums_without_a_ratio_mask_use_every_token"),
             "GSPO's sequence ratio grows with the sequence length"),
    # ---- probing fixes of issue 9's ninth session ---------------------------------------------------
    Mutation("adam-moment-overflow-unchecked", ENGINE,
             "torch.cat([*run.weight_views, *state])",
             "torch.cat(run.weight_views)",
             ("tests/test_bad_input_table.py::test_a_step_whose_second_moment_would_overflow_is_refused_and_its_gradient_discarded",),
             "a huge finite gradient leaves AdamW's second moment infinite: the weights never move again"),
    Mutation("huge-gradient-kept-after-refusal", ENGINE,
             "            if run.grad is not None and overflowed:\n",
             "            if False:\n",
             ("tests/test_bad_input_table.py::test_a_step_whose_second_moment_would_overflow_is_refused_and_its_gradient_discarded",
              "tests/test_bad_input_table.py::test_a_clipped_step_whose_gradient_norm_overflows_is_refused_and_its_gradient_discarded"),
             "a gradient whose square overflows is kept, so every later step of the run is refused"),
    Mutation("batch-gradient-too-large-to-square-added", ENGINE,
             "[torch.isfinite(torch.linalg.vector_norm(self.staged)).double()]",
             "[torch.isfinite(self.staged).all().double()]",
             ("tests/test_bad_input_table.py::test_a_forward_backward_whose_gradient_is_not_finite_adds_nothing",),
             "a batch with a finite but huge gradient is added, and the next step discards the good "
             "gradients accumulated before it too"),
    Mutation("clipped-by-an-overflowing-norm", ENGINE,
             "            stepped = stepped & torch.isfinite(grad_norm)\n",
             "            pass\n",
             ("tests/test_bad_input_table.py::test_a_clipped_step_whose_gradient_norm_overflows_is_refused_and_its_gradient_discarded",),
             "a clipped step whose gradient norm overflows zeroes every gradient and reports success"),
    # ---- issue 9's tenth session: a run's gradient and AdamW state in flat buffers ------------------
    Mutation("optimizer-state-left-unhomed", ENGINE,
             "                state[key] = view\n", "                pass\n",
             ("tests/test_bad_input_table.py::test_a_step_whose_second_moment_would_overflow_is_refused_and_its_gradient_discarded",),
             "the step's check reads a copy of the moments: an infinite second moment goes unseen"),
    Mutation("loaded-optimizer-state-left-unhomed", ENGINE,
             "        run.reset_optimizer_state()\n        run.step = step", "        run.step = step",
             ("tests/test_bad_input_table.py::test_a_step_whose_second_moment_would_overflow_is_refused_and_its_gradient_discarded",),
             "after load_state_with_optimizer the check reads the old moments: an infinite one goes unseen"),
    Mutation("accumulated-gradient-not-given-to-the-parameters", ENGINE,
             "                p.grad = views[i]", "                pass",
             ("tests/test_training.py",),
             "forward_backward's gradient never reaches AdamW: optim_step does nothing"),
    Mutation("pass-gradient-not-staged-in-the-buffer", ENGINE,
             "                torch._foreach_add_(", "                (lambda *_: None)(",
             ("tests/test_training.py",),
             "the pass's gradient is left beside the buffer that is committed: nothing is trained"),
    Mutation("optimizer-step-not-checked", ENGINE,
             'per_param["step"].numel() != 1:', "False:",
             ("tests/test_checkpoint_bad_input.py",),
             "a checkpoint whose step count is not one number loads, and the run's next step fails INTERNAL"),
    Mutation("unreached-parameters-given-a-gradient", ENGINE,
             "            if reached[i] and p.grad is None:", "            if p.grad is None:",
             ("tests/test_optimizer.py::test_a_parameter_no_batch_reaches_is_left_alone_by_adamw",),
             "a LoRA factor no batch reaches (a vision tower's) gets a zero gradient: weight decay shrinks it"),
    Mutation("attention-kernel-not-in-training", ENGINE,
             "if self.compiled else contextlib.nullcontext(), self.attention():",
             "if self.compiled else contextlib.nullcontext():",
             ("tests/test_bfloat16.py::test_with_sdpa_math_decode_step_logprobs_equal_training_logprobs_for_rows_of_one_length",),
             "--attention math samples with math but trains with SDPA's choice: bf16 logprobs still part"),
    Mutation("attention-kernel-not-in-sampling", S + "sampler_weights.py",
             "self.engine.autocast(), self.engine.attention(), adapter_layers_off",
             "self.engine.autocast(), adapter_layers_off",
             ("tests/test_bfloat16.py::test_with_sdpa_math_decode_step_logprobs_equal_training_logprobs_for_rows_of_one_length",),
             "--attention math trains with math but samples with SDPA's choice: bf16 logprobs still part"),
    Mutation("eager-attention-not-set", S + "attention.py",
             '        model.set_attn_implementation("eager")\n', "",
             ("tests/test_bfloat16.py::test_with_eager_attention_decode_step_logprobs_equal_training_logprobs_exactly",),
             "--attention eager is reported but SDPA still runs: bf16 logprobs still part"),
    Mutation("cli-attention-dropped", S + "cli.py",
             "cuda_graphs=args.cuda_graphs, attention=args.attention,", "cuda_graphs=args.cuda_graphs,",
             ("tests/test_server_lifecycle.py::test_cli_flags_are_parsed_into_the_config",),
             "--attention has no effect"),
    Mutation("small-outputs-spooled-to-a-file", S + "output_spool.py",
             "            if self._size <= self.memory_bytes:\n                return\n", "",
             ("tests/test_output_spool.py::test_small_outputs_stay_in_memory_and_read_back_exactly",),
             "every training step opens, writes and deletes a file on the event loop"),
    Mutation("held-outputs-read-from-the-start", S + "output_spool.py",
             "            return self._held[start:end]\n", "            return self._held[:end - start]\n",
             ("tests/test_output_spool.py::test_small_outputs_stay_in_memory_and_read_back_exactly",),
             "ReadOutputs from datum 1 returns datum 0's logprobs"),
    Mutation("sampling-turn-keeps-adapters-on", S + "sampler_weights.py",
             "adapter_layers_off(self.engine.lora_layers):", "contextlib.nullcontext():",
             ("tests/test_sampling.py", "tests/test_batched_sampling.py"),
             "base-model samples (and every adapter row) also get the active run's LoRA delta"),
    Mutation("sampling-turn-leaves-adapters-off", S + "lora_batch.py",
             "            layer._disable_adapters = disabled\n", "            pass\n",
             ("tests/test_sampling.py", "tests/test_training.py"),
             "after any sampling, training computes without its LoRA adapter"),
    Mutation("kept-graph-counts-the-base-weights", ENGINE,
             "        return self._base_storages | {p.untyped_storage().data_ptr() for p in run.params}",
             "        return {p.untyped_storage().data_ptr() for p in run.params}",
             ("tests/test_memory.py::test_a_kept_forward_counts_its_activations_and_not_the_weights",),
             "a custom loss's forward leg is charged the model's weights: its graph is rarely kept, "
             "and the backward leg recomputes the forward"),
    Mutation("kept-graph-counts-the-lora-weights", ENGINE,
             "        return self._base_storages | {p.untyped_storage().data_ptr() for p in run.params}",
             "        return self._base_storages",
             ("tests/test_memory.py::test_a_kept_forward_counts_its_activations_and_not_the_weights",),
             "a kept graph is charged the run's LoRA weights besides its activations"),
    Mutation("committed-pass-keeps-its-gradient-buffer", ENGINE,
             "        self.staged, self.staged_views = None, []\n", "        self.staged = None\n",
             ("tests/test_memory.py::test_a_committed_pass_holds_no_gradient_buffer",),
             "an idle worker keeps a second gradient-sized buffer alive (the last pass's)"),
    Mutation("ttl-beyond-a-century-accepted", VALIDATION,
             "if value is not None and not 1 <= value <= MAX_TTL_SECONDS:",
             "if value is not None and value < 1:",
             ("tests/test_tinker_surface.py::test_bad_ttl_is_rejected_and_saves_nothing",
              "tests/test_tinker_surface.py::test_a_checkpoints_ttl_can_be_set_and_removed"),
             "a TTL of 10**12 s is stored, and every listing of the server fails INTERNAL from then on"),
    Mutation("expired-checkpoint-name-stays-taken", CHECKPOINTS,
             "        if expired(find(root, path.path, include_expired=True).metadata):\n            return\n",
             "        if False:\n            return\n",
             ("tests/test_tinker_surface.py::test_an_expired_checkpoints_name_can_be_saved_again_before_the_sweep",),
             "saving the name of an expired checkpoint is ALREADY_EXISTS until the next sweep"),
    Mutation("damaged-checkpoint-downloaded", CHECKPOINTS,
             "                _check(checkpoint, name, handle)\n", "                pass\n",
             ("tests/test_resources.py::test_a_damaged_checkpoint_is_not_downloaded",),
             "download_checkpoint hands out a damaged file without an error"),
    Mutation("checkpoint-removed-by-hand-undeletable", S + "checkpoint_ops.py",
             "        if not gone or index.get_checkpoint(path) is None:\n",
             "        if True:\n",
             ("tests/test_resources.py::test_a_listed_checkpoint_removed_by_hand_can_be_deleted_from_the_listing",),
             "a checkpoint whose folder was removed stays listed, and deleting it is NOT_FOUND"),
    Mutation("paging-negative-window-sliced", "sdk/gradwire/rest_client.py",
             "            if value < 0:\n", "            if value < -1:\n",
             ("tests/test_rest_client_paging.py::test_a_negative_or_fractional_window_is_refused_naming_it",),
             "list_user_checkpoints(limit=-1) silently drops the last checkpoint"),
    Mutation("safetensors-file-mode-0600", CHECKPOINTS,
             "        shutil.copymode(temp / ADAPTER_CONFIG, temp / ADAPTER_WEIGHTS)  # safetensors writes 0600\n", "",
             ("tests/test_checkpoint_format.py::test_every_checkpoint_file_has_the_same_permissions",),
             "another user may read a checkpoint's config but not its weights"),
    Mutation("sample-async-returns-a-future", "sdk/gradwire/sampling_client.py",
             "        return await self.sample(prompt, num_samples,", "        return self.sample(prompt, num_samples,",
             ("tests/test_sampling.py::test_async_twins_and_client_futures",),
             "`await sampler.sample_async(...)` gives a future, not the response (Tinker code crashes)"),
    Mutation("datum-past-a-message-sent", "sdk/gradwire/_convert.py",
             "        if message_size > MAX_DATUM_BYTES:", "        if False:",
             ("tests/test_server_lifecycle.py::test_a_request_the_sdk_refuses_takes_no_seq_id",),
             "a datum over 4 MiB is RESOURCE_EXHAUSTED as a rate limit, and the run's next request waits 60 s"),
    Mutation("adam-params-none-defaulted", "sdk/gradwire/_convert.py",
             "            raise TypeError(f\"optim_params.{name}: {value!r} is not a number\")",
             "            value = 1e-4 if value is None else value",
             ("tests/test_bad_input.py::test_the_sdk_refuses_a_mistyped_field_naming_it_and_nothing_changes",),
             "AdamParams(learning_rate=None) silently trains at 1e-4"),
    Mutation("rank-zero-becomes-32", "sdk/gradwire/_convert.py",
             "    if rank < 1:", "    if rank < 0:",
             ("tests/test_bad_input.py::test_the_sdk_refuses_a_mistyped_field_naming_it_and_nothing_changes",),
             "create_lora_training_client(rank=0) makes a rank-32 run"),
    Mutation("stop-strings-read-as-token-ids", "sdk/gradwire/_convert.py",
             "    elif all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in stop):",
             "    elif True:",
             ("tests/test_bad_input.py::test_the_sdk_refuses_a_mistyped_field_naming_it_and_nothing_changes",),
             "stop=[\"54\", 54] stops at token 54; stop=[1.5] at token 1"),
    Mutation("custom-metric-names-unchecked", "sdk/gradwire/custom_loss.py",
             "        if not isinstance(key, str):\n", "        if False:\n",
             ("tests/test_bad_input.py::test_the_sdk_refuses_a_mistyped_field_naming_it_and_nothing_changes",),
             "a custom loss's metric named 7 comes back as a metric named 7"),
    Mutation("failed-request-not-request-failed-error", "sdk/gradwire/errors.py",
             "failed = _unpickled(getattr(Failed, type(error).__name__), error.args)",
             "failed = _unpickled(type(error), error.args)",
             ("tests/test_tinker_compat.py::test_errors_are_caught_as_code_written_for_tinker_catches_them",),
             "`except tinker.RequestFailedError` misses a request that failed on the server"),
    Mutation("timeout-not-a-timeout-error", "sdk/gradwire/errors.py",
             "class APITimeoutError(APIConnectionError, TimeoutError):", "class APITimeoutError(APIConnectionError):",
             ("tests/test_tinker_compat.py::test_errors_are_caught_as_code_written_for_tinker_catches_them",
              "tests/test_types.py::test_a_future_is_fetched_in_the_background_and_waiters_keep_their_own_timeouts"),
             "`except TimeoutError` misses result(timeout=...) running out"),
    Mutation("sampling-client-unpicklable", "sdk/gradwire/sampling_client.py",
             "    def __reduce__(self):", "    def _reduce_unused(self):",
             ("tests/test_sampling.py::test_a_sampling_client_pickles_into_another_process",),
             "a SamplingClient cannot be handed to a worker process"),
    Mutation("forward-leg-operation-left-behind", "sdk/gradwire/client.py",
             "            finally:\n                service._transport.delete_operation(forward)\n",
             "            finally:\n                pass\n",
             ("tests/test_custom_loss.py::test_a_custom_loss_call_leaves_no_operation_on_the_server",),
             "every custom-loss call leaves its forward leg's operation (and outputs) on the server"),
    Mutation("response-size-refusal-points-to-sample-stream", S + "sampling_validation.py",
             "(\", or use SampleStream\" if not (stream or top) else \"\")", "\", or use SampleStream\"",
             ("tests/test_sampling_params.py::test_a_response_too_large_for_one_message_is_refused_naming_num_samples",),
             "the refusal sends a user with top-k logprobs to SampleStream, which refuses them"),
    Mutation("future-done-only-after-result", "sdk/gradwire/futures.py",
             "            submitted.add_done_callback(start)\n", "",
             ("tests/test_scheduling.py::test_done_turns_true_once_the_server_finishes_without_anyone_asking_for_the_result",),
             "done() never turns True and a loop polling it never ends"),
    Mutation("closed-client-poll-reads-as-cancelled", "sdk/gradwire/_transport.py",
             "                self.check_open()  # closed meanwhile: that, not the CANCELLED it caused\n", "",
             ("tests/test_server_lifecycle.py::test_a_closed_client_says_so",),
             "a result cut off by close() reads RequestCancelledError, as if the request had been cancelled"),
    # ---- --sampler-logprobs training ---------------------------------------------------------------
    Mutation("training-logprobs-from-decode-steps", S + "sampler.py",
             '        later = self.logprobs_from == "training"  #', "        later = False  #",
             ("tests/test_sampler_logprobs.py",
              "tests/test_bfloat16.py::test_sampled_logprobs_are_the_training_logprobs_exactly_by_default"),
             "a bf16 server's sampled logprobs part from training's by the decode steps' rounding"),
    Mutation("training-logprobs-scored-with-the-prompt-only", S + "sampler.py",
             "        tokens = np.concatenate([prompt, sequence.tokens]).astype(np.int64)\n",
             "        tokens = np.concatenate([prompt, sequence.tokens[:-1], [0]]).astype(np.int64)\n",
             ("tests/test_sampler_logprobs.py",),
             "a sample's last token gets the logprob of another token"),
    Mutation("training-logprobs-prompt-scores-from-prefill", S + "sampler.py",
             '        return generation.want_scores and self.logprobs_from == "decode"\n',
             "        return generation.want_scores\n",
             ("tests/test_sampler_logprobs.py::test_prompt_logprobs_and_compute_logprobs_are_the_training_forwards",
              "tests/test_bfloat16.py::test_prompt_logprobs_are_the_training_logprobs_exactly_by_default"),
             "prompt logprobs part from training's while sampled ones agree"),
    Mutation("training-logprobs-adapter-left-out", S + "sampler.py",
             "        with self._as_training(adapter):\n", "        with self._as_training(None):\n",
             ("tests/test_sampler_logprobs.py",),
             "a trained sampler's logprobs are the base model's"),
    Mutation("training-logprobs-streamed-twice", S + "sampler.py",
             "sequence.logprobs[sequence.reported_logprobs:],", "sequence.logprobs[sequence.reported:],",
             ("tests/test_sampler_logprobs.py::test_a_stream_sends_a_samples_logprobs_with_its_last_piece",),
             "a stream's last piece misses the logprobs of every token streamed before it"),
    Mutation("auto-sampler-logprobs-always-decode", S + "sampler.py",
             '        return "training" if dtype == torch.bfloat16 else "decode"', '        return "decode"',
             ("tests/test_bfloat16.py::test_sampled_logprobs_are_the_training_logprobs_exactly_by_default",),
             "a bf16 server's default sampled logprobs part from training's"),
    Mutation("prompt-only-request-waits-for-kv-cache", S + "sampler.py",
             "            for generation in [g for g in self.waiting if not g.sequences]:\n",
             "            for generation in []:\n",
             ("tests/test_sampler_logprobs.py::test_compute_logprobs_needs_no_kv_cache",),
             "compute_logprobs of a long prompt is refused for a KV cache it does not use"),
    Mutation("training-pass-out-of-memory-fails-the-loop", S + "sampler.py",
             "        except torch.OutOfMemoryError as error:\n            generation.error = torch.OutOfMemoryError(\n"
             "                f\"scoring {what} by a training pass",
             "        except ZeroDivisionError as error:\n            generation.error = torch.OutOfMemoryError(\n"
             "                f\"scoring {what} by a training pass",
             ("tests/test_sampler_logprobs.py::test_a_sample_whose_training_pass_runs_out_of_memory_fails_its_request_alone",
              "tests/test_sampler_logprobs.py::test_a_prompt_whose_training_pass_runs_out_of_memory_fails_its_request_alone"),
             "one sample's or prompt's training pass running out of memory fails every request being sampled"),
    Mutation("prompt-scored-outside-the-loops-reach", S + "sampler.py",
             "                self._score_prompt(generation)  # (still waiting: a failure of the loop reaches it)\n"
             "                self.waiting.remove(generation)\n",
             "                self.waiting.remove(generation)\n                self._score_prompt(generation)\n",
             ("tests/test_sampler_logprobs.py::test_any_other_failure_of_a_prompts_training_pass_fails_the_loop_and_waits_for_nothing",),
             "a compute_logprobs whose scoring fails while another request's task runs the loop waits forever"),
    Mutation("prefilled-request-finished-outside-the-loops-reach", S + "sampler.py",
             "                    self._finish_prefill(generation, logits[row, -1:])\n                    self.prefilling.remove(generation)\n",
             "                    self.prefilling.remove(generation)\n                    self._finish_prefill(generation, logits[row, -1:])\n",
             ("tests/test_sampler_logprobs.py::test_any_other_failure_of_a_prompts_training_pass_fails_the_loop_and_waits_for_nothing",),
             "a sample whose prompt scoring fails while another request's task runs the loop waits forever"),
    Mutation("stop-strings-match-special-tokens", S + "sampling_servicer.py",
             "        return self.engine.base.tokenizer.decode(tokens, skip_special_tokens=True)\n",
             "        return self.engine.base.tokenizer.decode(tokens)\n",
             ("tests/test_sampling.py::test_stop_strings_are_matched_in_the_text_without_special_tokens",),
             "a stop string \"e\" ends a sample at <|im_end|>, whose text holds an e"),
    Mutation("sample-request-id-reused-with-other-fields", S + "sampling_servicer.py",
             "                if fingerprint != validation.request_fingerprint(request):\n", "                if False:\n",
             ("tests/test_sampling.py::test_sample_is_a_long_running_operation",),
             "a Sample reusing an earlier request_id with another prompt gets the earlier one's samples"),
    Mutation("create-request-id-reused-with-other-fields", S + "training_servicer.py",
             "            if first != fingerprint:\n", "            if False:\n",
             ("tests/test_checkpoints.py::test_a_request_id_sent_again_with_other_fields_is_refused",),
             "a CreateModel of rank 8 reusing a request_id gets the earlier rank-2 run"),
    Mutation("compiled-server-sampler-passes-eager", S + "sampler.py",
             "        if self.compiled is None or adapter is None or not all(",
             "        if True or adapter is None or not all(",
             ("tests/test_compiled_layers.py::test_the_samplers_training_logprobs_are_the_compiled_forwards",),
             "with --compile, sampled logprobs part from training's (eager layers round apart from compiled ones)"),
    Mutation("compiled-sampler-factors-of-another-type", S + "sampler.py",
             "torch.nn.Parameter(a), torch.nn.Parameter(b), scale)", "a, b, scale)",
             ("tests/test_compiled_layers.py::test_runs_of_other_ranks_and_shapes_reuse_the_graphs",),
             "with --compile, the first sample of the sampler's own weights waits for a compile"),
    Mutation("warm-up-leaves-one-datum-uncompiled", ENGINE,
             "            self.micro_batch_logprobs(run, _two_sequences(length)[:1])\n", "",
             ("tests/test_compiled_layers.py::test_the_server_compiles_the_usual_graphs_before_it_serves",),
             "with --compile, a forward of one datum (and the sampler's first training pass) waits for a compile"),
    Mutation("nested-adapter-switch-turns-peft-layers-on", S + "lora_batch.py",
             "            layer._disable_adapters = disabled\n", "            layer._disable_adapters = False\n",
             ("tests/test_compiled_layers.py::test_rows_decoded_after_a_samples_compiled_pass_keep_their_own_weights",),
             "with --compile, rows decoded after a sample's training pass compute with a run's adapter too"),
    Mutation("prefill-scores-out-of-memory-fail-the-loop", S + "sampler.py",
             "        except torch.OutOfMemoryError as error:\n            generation.error = torch.OutOfMemoryError(\n"
             "                f\"scoring a prompt ({len(prompt)} tokens) from its prefill's logits",
             "        except ZeroDivisionError as error:\n            generation.error = torch.OutOfMemoryError(\n"
             "                f\"scoring a prompt ({len(prompt)} tokens) from its prefill's logits",
             ("tests/test_batched_sampling.py::test_scoring_a_prompt_from_its_prefill_out_of_memory_fails_its_request_alone",),
             "a long prompt's scores running out of memory fail every request being sampled"),
    Mutation("failed-prefill-chunk-scoring-keeps-prefilling", S + "sampler.py",
             "                if generation.error is not None:\n                    self.prefilling.remove(generation)\n",
             "                if False:\n                    self.prefilling.remove(generation)\n",
             ("tests/test_batched_sampling.py::test_scoring_a_prompt_from_its_prefill_out_of_memory_fails_its_request_alone",),
             "a prompt whose chunk could not be scored goes on prefilling, its scores missing a chunk"),
    Mutation("prefill-chunk-scores-off-by-one", S + "sampler.py",
             "        targets = prompt[start + 1:start + 1 + len(logits)]",
             "        targets = prompt[start:start + len(logits)]",
             ("tests/test_batched_sampling.py::test_long_prompt_is_prefilled_in_chunks_exactly",),
             "prompt logprobs score each token under its own position's logits"),
    Mutation("prefill-chunk-top-rows-of-the-first-chunk-only", S + "sampler.py",
             "np.concatenate([chunk_top[i] for _, chunk_top in chunks])",
             "np.concatenate([chunk_top[i] for _, chunk_top in chunks[:1]])",
             ("tests/test_batched_sampling.py::test_long_prompt_is_prefilled_in_chunks_exactly",),
             "a long prompt's top-k prompt logprobs cover its first prefill chunk only"),
    Mutation("special-token-stop-string-never-matches", S + "sampling_validation.py",
             "            tokens.add(special_tokens[stop])\n", "            texts.append(stop)\n",
             ("tests/test_sampling.py::test_stop_strings_are_matched_in_the_text_without_special_tokens",),
             "stop=\"<|im_end|>\" never stops a sample"),
    Mutation("released-adapters-stay-in-the-loops-caches", S + "sampler.py",
             "                if in_use.issuperset(key if isinstance(key, tuple) else (key,))}",
             "                if True}",
             ("tests/test_batched_sampling.py::test_a_released_snapshots_factors_are_freed_once_other_weights_sample",),
             "every released snapshot's factors stay on the device (up to 15 adapters' worth)"),
    Mutation("prompt-logprobs-last-n-alone-ignored", S + "sampling_validation.py",
             "    if last_n is not None and not (request.include_prompt_logprobs or k):\n", "    if False:\n",
             ("tests/test_sampling.py::test_prompt_logprobs_last_n_without_prompt_scores_is_refused_and_changes_nothing",),
             "sample(prompt_logprobs_last_n=2) without prompt scores is silently ignored"),
    Mutation("prefill-out-of-memory-fails-the-loop", S + "sampler.py",
             "            except torch.OutOfMemoryError as error:  # fails this pass's requests alone",
             "            except ZeroDivisionError as error:  # fails this pass's requests alone",
             ("tests/test_batched_sampling.py::test_a_prefill_pass_that_runs_out_of_memory_fails_its_requests_alone",),
             "a prefill pass running out of memory fails every request being sampled"),
    Mutation("lora-scale-folded-into-b", S + "lora_batch.py",
             "            return output + ((low_rank @ b.T) * scale).to(output.dtype)\n",
             "            return output + (low_rank @ (b * scale[0, 0, 0].to(b.dtype)).T).to(output.dtype)\n",
             ("tests/test_sampler_logprobs.py::test_sampled_logprobs_and_their_top_k_are_the_training_forwards",
              "tests/test_bfloat16.py::test_sampled_logprobs_are_the_training_logprobs_exactly_by_default"),
             "with a LoRA rank whose scale is not a power of two, sampled logprobs part from training's"),
    Mutation("lora-scale-of-another-row", S + "lora_batch.py",
             "        return self.scales[:, self._row_ids(rows)][:, :, None, None]\n",
             "        return self.scales[:, :1].expand(-1, len(rows))[:, :, None, None]\n",
             ("tests/test_batched_sampling.py::test_rows_of_different_adapters_match_their_references",
              "tests/test_decode_graphs.py"),
             "rows of adapters of different scales decode with the first adapter's scale"),
    Mutation("cli-sampler-logprobs-dropped", S + "cli.py",
             "                        sampler_logprobs=args.sampler_logprobs)", "                        )",
             ("tests/test_server_lifecycle.py::test_cli_flags_are_parsed_into_the_config",),
             "--sampler-logprobs has no effect"),
]


def apply(mutation: Mutation, tree: pathlib.Path) -> None:
    """Applies the mutation to the copy; ValueError unless its snippet occurs exactly once."""
    path = tree / mutation.file
    text = path.read_text()
    for old, new in mutation.edits():
        count = text.count(old)
        if count != 1:
            raise ValueError(f"{mutation.name}: the old snippet occurs {count} times in {mutation.file} "
                             "(the code changed: update the snippet in scripts/mutation_check.py)")
        text = text.replace(old, new)
    path.write_text(text)


def check_snippets(mutations: list[Mutation]) -> list[str]:
    """Problems with the list: snippets not found once, unknown test files, repeated names."""
    problems, names = [], set()
    for mutation in mutations:
        if mutation.name in names:
            problems.append(f"{mutation.name}: repeated name")
        names.add(mutation.name)
        text = (ROOT / mutation.file).read_text() if (ROOT / mutation.file).exists() else None
        for old, _ in mutation.edits():
            count = text.count(old) if text is not None else -1
            if count != 1:
                problems.append(f"{mutation.name}: old snippet found {count} times in {mutation.file}")
        for test in mutation.tests:
            if not (ROOT / test.split("::")[0]).exists():
                problems.append(f"{mutation.name}: no test file {test}")
    return problems


def run_tests(tree: pathlib.Path, tests: tuple[str, ...], timeout_s: float) -> tuple[int, str]:
    """(pytest's exit code, its output tail) for the tests, run against the tree."""
    env = dict(os.environ, PYTHONPATH=f"{tree / 'sdk'}{os.pathsep}{tree / 'service'}", HF_HUB_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1")
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout_s:g} s"
    return done.returncode, (done.stdout + done.stderr)[-3000:]


def check(mutation: Mutation | None, timeout_s: float, tests: tuple[str, ...] = ()) -> tuple[str, float, str]:
    """(caught | survived | error, seconds, pytest output tail) of the mutation's tests.
    None: the unmutated baseline, running `tests`."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gradwire-mutant-") as folder:
        tree = pathlib.Path(folder) / "tree"
        shutil.copytree(ROOT, tree, ignore=COPY_IGNORE, symlinks=True)
        if mutation is not None:
            apply(mutation, tree)
            tests = mutation.tests
        code, output = run_tests(tree, tests, timeout_s)
    # pytest: 0 all passed, 1 some failed; anything else (collection error, crash, timeout) is no verdict.
    verdict = {0: "survived", 1: "caught"}.get(code, "error")
    return verdict, time.monotonic() - start, output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this mutation (repeatable)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutations checked at once (default 1)")
    parser.add_argument("--baseline", action="store_true",
                        help="first run the chosen mutations' tests on the unmutated tree (must pass)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per mutation")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's output tail")
    args = parser.parse_args()

    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:50s} {m.file}  [{', '.join(m.tests)}]\n{'':50s} bug: {m.bug}")
        return 0
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"unknown mutation(s): {sorted(unknown)}; see --list")
        return 2
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    problems = check_snippets(chosen)
    if problems:
        print("the mutation list is out of sync with the code:", *problems, sep="\n  ")
        return 2

    if args.baseline:
        verdict, seconds, output = check(None, args.timeout * 3, tuple(sorted({t for m in chosen for t in m.tests})))
        print(f"baseline: {'passed' if verdict == 'survived' else 'FAILED'} ({seconds:.0f} s)")
        if verdict != "survived":
            print(output)
            return 2

    results: dict[str, str] = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(check, m, args.timeout): m for m in chosen}
        for future in concurrent.futures.as_completed(futures):
            mutation = futures[future]
            verdict, seconds, output = future.result()
            results[mutation.name] = verdict
            print(f"{verdict.upper():8s} {mutation.name} ({seconds:.0f} s): {mutation.bug}", flush=True)
            if args.verbose or verdict == "error":
                print("    " + output.replace("\n", "\n    "))
    caught = [n for n in results if results[n] == "caught"]
    survived = [m.name for m in chosen if results[m.name] == "survived"]
    errors = [m.name for m in chosen if results[m.name] == "error"]
    print(f"\n{len(caught)} of {len(chosen)} mutations caught")
    if survived:
        print("survived:", ", ".join(survived))
    if errors:
        print("no verdict (error or timeout):", ", ".join(errors))
    return 0 if not survived and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
