"""Every test sees 8 simulated CPU devices, so sharding is always exercised."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile far more than they run: without XLA's backend optimisation and LLVM's expensive passes, and with
# XLA's CPU fusions emitted straight to LLVM IR rather than through MLIR, programs compile in far less time (the fast
# tier of test_ppo.py and test_grpo.py: 73-75 s against 110-148 s with the MLIR emitters, on 2 cores) and compute
# the same functions. Runs the tests start as subprocesses get the same flags (`compile_helpers.subprocess_env`), so
# that a killed-and-resumed run compares bitwise with a straight one.
FAST_COMPILE = ("--xla_force_host_platform_device_count=8", "--xla_llvm_disable_expensive_passes=true",
                "--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
for flag in FAST_COMPILE:
    if flag.partition("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
# Many tests (and the CLI runs they start as subprocesses) compile the same programs: a compilation cache for this
# session only, so every session still compiles everything once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlhf_jax_test_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.3"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# configs/demo.yaml shortened to about a minute: the same stages and data, fewer examples and steps.
SHORT_DEMO = ["pipeline.task.task.corpus=1500", "pipeline.task.task.demonstrations=300",
              "pipeline.task.task.prompts=600", "pipeline.pretrain.train.steps=200", "pipeline.sft.train.steps=30",
              "pipeline.rm.train.epochs=3", "pipeline.ppo.train.steps=24", "pipeline.ppo.train.log_every=4",
              "pipeline.ppo.train.save_every=8", "pipeline.ppo.train.keep_checkpoints=3",
              "pipeline.ppo.ppo.samples_every=0"]
# The fast tier (`make test`) shortens it further: every stage runs end to end once; the full tier, which checks
# what each stage achieves (tests/test_pipeline.py), runs SHORT_DEMO.
FAST_DEMO = [*SHORT_DEMO, "pipeline.task.task.prompts=300", "pipeline.pretrain.train.steps=20",
             "pipeline.sft.train.steps=20", "pipeline.rm.train.epochs=1", "pipeline.dpo.train.epochs=1",
             "pipeline.ppo.train.steps=6", "pipeline.ppo.train.save_every=2", "pipeline.ppo.train.log_every=2"]


def fast_tier(config) -> bool:
    return config.getoption("markexpr") == "not full"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, request):
    """The main job's pipeline, shortened, run once through the CLI: {"dir", "argv", "stderr", "report",
    "ppo_saves"} (the PPO run's saved steps). Tests that change its files must leave them as they found them."""
    from cli_helpers import run_quietly
    from rlhf_jax import main as main_cli

    run_dir = tmp_path_factory.mktemp("demo") / "run"
    argv = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"), f"run_dir={run_dir}",
            *(FAST_DEMO if fast_tier(request.config) else SHORT_DEMO)]
    rc, _, err = run_quietly(main_cli.main, argv)
    assert rc == 0, err[-3000:]
    saves = sorted(int(p.name) for p in (run_dir / "ppo" / "checkpoints").iterdir() if p.name.isdigit())
    return {"dir": run_dir, "argv": argv, "stderr": err, "report": json.loads((run_dir / "report.json").read_text()),
            "ppo_saves": saves}


# The full tier only (`make test-all`, CI): what `make test` leaves out to stay within a few minutes. The fast tier
# still runs every stage end to end (the demo pipeline of `demo_run`) and every numerical oracle at least once;
# these are the slow repeats: other processes and meshes, kills and resumes, more shapes of a checked property,
# the reference configs' full-size compiles and the whole-pipeline plans.
FULL_TIER = (
    "test_multiprocess.py::",
    "test_distributed.py::test_a_process_left_waiting_for_one_that_is_gone_ends_in_one_line",  # a minute's timeout
    "test_distributed.py::test_a_process_whose_peer_never_joins_stops_in_one_line_at_the_timeout[1]",  # [0]: fast
    "test_run_failures.py::test_a_save_killed_mid_write_is_removed_in_words_on_resume",  # a run and its resume
    "test_run_failures.py::test_a_checkpoint_from_before_a_key_existed_resumes_without_a_word_of_it",  # the same
    "test_run_failures.py::test_a_resume_short_of_memory_stops_in_one_line_and_keeps_the_checkpoint[stored]",
    "test_pipeline.py::test_steps_finished_by_a_version_with_fewer_config_keys_stay_finished",  # pipeline reruns
    "test_grpo.py::test_a_second_signal_stops_at_once_while_the_reward_function_runs",  # a signal repeat
    "test_grpo.py::test_no_eos_penalty_replaces_the_reward_of_exactly_the_rows_that_never_ended[rloo]",  # [grpo]
    "test_cli.py::test_main_without_a_config_says_it_runs_the_defaults",  # a default-length generate run
    "test_cli.py::test_the_generate_cli_stops_quietly_when_its_reader_does",  # a subprocess of its own
    "test_grpo.py::test_the_rollouts_kl_is_k1_from_the_policy_to_the_reference[rloo]",  # [grpo]: the same KL
    "test_scan_layers.py::test_a_scanned_stage_trains",  # the model-level oracles stay in the fast tier
    "test_scan_layers.py::test_generation_scans",
    "test_scan_layers.py::test_one_compiled_body_whatever_the_depth",  # the scanned stack's oracles stay fast
    "test_scan_layers.py::test_gradients_are_the_loops_stacked[True]",  # remat's gradients: test_model (fast)
    "test_scan_layers.py::test_cached_decode_and_sampling_through_the_stacked_cache[mistral]",  # gemma3: fast
    "test_token_stats.py::test_chunked_stats_and_gradients_are_the_dense_ones[4]",  # [12] chunks with a remainder
    "test_token_stats.py::test_chunked_stats_and_gradients_are_the_dense_ones[1024]",
    "test_ppo.py::test_ppo_stage_runs_and_resumes_bitwise_after_sigkill",
    "test_ppo.py::test_gradient_accumulation_inside_a_minibatch_equals_the_whole_minibatch",
    "test_ppo.py::test_mesh_of_8_agrees_with_one_device",  # 1 device vs 8: test_model, test_train (fast tier)
    "test_ppo.py::test_ppo_stage_with_ptx",
    "test_ppo.py::test_value_lr_sets_the_value_models_learning_rate",
    "test_ppo.py::test_ema_of_the_policy_follows_its_formula",
    "test_ppo.py::test_adaptive_kl_controller_runs_inside_the_iteration",
    "test_ppo.py::test_learning_rate_zero_moves_nothing",
    "test_ppo.py::test_one_compilation_serves_every_iteration_and_the_laps_time_each_phase",
    "test_train.py::test_signal_saves_the_step_in_hand_and_exits_4",
    "test_train.py::test_resume_after_sigkill_is_bitwise_identical",
    "test_train.py::test_rm_epoch_reference_dataset_bias_and_micro_batched_eval",
    "test_train.py::test_losses_independent_of_mesh[8x1x1",
    "test_train.py::test_losses_independent_of_mesh[1x2x4",
    "test_train.py::test_losses_independent_of_mesh[2x2x2-",  # the fast tier: test_model's and test_plan's meshes
    "test_loop.py::test_weight_decay_hits_only_weight_matrices[gpt2]",
    "test_train.py::test_loss_on_prompt_trains_on_prompt_tokens",
    "test_train.py::test_truncated_examples_are_counted",
    # a resume's refusals: test_run_failures checks every refused key (fast); these are two whole runs
    "test_train.py::test_resume_with_another_seed_is_refused",
    "test_plan.py::test_dry_run_of_the_demo_plans_sft_rm_and_ppo_and_writes_nothing",
    "test_lora_stages.py::test_lora_sft_on_the_demo_task_reaches_nine_tenths_of_full_finetunings_improvement",  # 3 sft runs
    # LoRA beyond its SFT run, PEFT export and exactness at initialisation (the fast tier): resume (bitwise, as
    # test_train's), rm, the stages' reference rules, the mesh, the one-copy check and the dry run's column
    "test_lora_stages.py::test_lora_sft_resumes_bitwise",
    "test_lora_stages.py::test_evaluation_merges_a_lora_checkpoint_on_a_bf16_base",  # an sft run of its own
    "test_lora_stages.py::test_whole_weights_in_bf16_are_warned_about",  # two sft runs
    "test_lora_stages.py::test_lora_rm_trains_adapters_and_its_scalar_head",
    "test_lora_stages.py::test_lora_grpo_reference_is_the_base_and_exports",
    "test_lora_stages.py::test_lora_ppo_starts_at_its_reference_moves_away_from_it_and_exports",
    "test_lora_stages.py::test_lora_dpo_reference_keeps_the_also_trained_weights_as_they_were",
    "test_lora_stages.py::test_lora_losses_on_a_mesh_of_8_are_one_devices",  # test_train's in the fast tier
    "test_buckets.py::test_an_sft_run_in_buckets_logs_the_full_widths_losses",  # test_train's sft runs in buckets
    # the early-exit sampler's other cases (the fast tier: rows ending early against the scan; test_model runs the
    # sampler on a mesh of 8 against one device)
    *(f"test_sampling_exit.py::test_while_loop_equals_the_scan_and_stops_when_every_row_has_ended[{c}-"
      for c in ("no_eos", "greedy", "top_p", "top_k_top_p")),  # in one loop and in decode segments alike
    "test_sampling_exit.py::test_sharded_over_8_devices_equals_the_scan",
    "test_sampling_exit.py::test_one_new_token_takes_no_step",
    "test_sampling_exit.py::test_threshold_top_p_at_a_mass_exactly_equal_to_top_p",  # the sort's ties: fast tier
    # sampling with top-k and top-p against teacher forcing: test_ppo's check at a temperature stays in the fast tier
    "test_model.py::test_sampler_logprobs_equal_teacher_forced[0.7-10-0.9]",
    "test_lora_stages.py::test_lora_dpo_reference_is_the_base_without_the_adapter",  # dpo's LoRA reference rule
    "test_sampling_exit.py::test_threshold_top_p_keeps_the_sorts_tokens[50-",
    # chunked attention: the fast tier keeps the oracles (a per-query loop), the soft-capped cache prefill with a
    # window, the packed case, the whole model and the memory check
    *(f"test_attention_chunked.py::test_chunked_attention_matches_unchunked[{c}]"
      for c in ("causal", "left_padding", "sliding_window", "prefill_into_cache", "gemma2_softcap_scalar")),
    "test_lora_stages.py::test_lora_ppo_holds_one_copy_of_the_policy_base",
    "test_ppo.py::test_the_value_model_from_the_reward_model_starts_at_normalised_scores[k3, whitened]",
    "test_ppo.py::test_scores_are_normalised_and_the_no_eos_penalty_replaces_them[k3, whitened]",
    "test_train.py::test_grad_accumulation_matches_one_batch",  # the steps' accumulation oracle: test_losses
    "test_plan.py::test_lora_steps_are_planned_beside_full_finetuning",
    "test_plan.py::test_a_step_that_does_not_fit_gets_a_real_suggestion",
    "test_plan.py::test_llama3_8b_pipeline_on_64_devices",
    "test_plan.py::test_flops_are_per_device_and_fast_cpu_codegen_leaves_memory_alone",
    "test_pipeline.py::test_the_demo_pipeline_shortened_shows_every_effect_and_resumes_to_the_same_report",
    "test_reference_configs.py::test_training_step_compiles_at_the_configs_sizes",
    "test_run_models.py::test_a_changed_fixed_kl_coef_is_applied_on_resume",
    "test_run_models.py::test_resume_refuses_a_model_replaced_at_its_path",
    "test_run_failures.py::test_corrupt_latest_checkpoint_falls_back_to_the_previous_one",
    "test_run_failures.py::test_resume_refuses_another_model_and_allows_harmless_changes",
    "test_losses.py::test_gradient_accumulation_equals_one_large_batch",  # accumulation: test_train (fast tier)
    "test_model.py::test_sampler_logprobs_equal_teacher_forced[1.0-0-1.0]",
    # the chunked loss against its loop at chunks of 4 and 6 positions (the fast tier: 1 and one whole chunk)
    "test_losses.py::test_next_token_nll_equals_loop[4]",
    "test_losses.py::test_next_token_nll_equals_loop[6]",
    "test_model.py::test_bfloat16_compute_keeps_the_heads_float32_accumulator[scalar]",  # the LM head's: fast tier
    "test_cli.py::test_main_generate_config_runs_generate_stage",  # test_pipeline's fast pipeline starts with one
    # more cases of a property the fast tier checks once (there: the (2, 2, 2) mesh, llama, qwen2)
    "test_model.py::test_mesh_of_8_equals_one_device[mesh_shape0]",
    "test_model.py::test_mesh_of_8_equals_one_device[mesh_shape2]",
    "test_model.py::test_mesh_of_8_equals_one_device[mesh_shape3]",
    "test_model.py::test_left_padding_does_not_change_logits[gpt2]",
    "test_hf.py::test_reward_export_scores_our_last_token_in_transformers[llama-False]",
    # the oracle of a speed-up and of PPO-ptx (the fast tier checks the iteration's first ratio and its rollout)
    "test_ppo.py::test_first_step_reusing_the_rollout_forward_equals_a_direct_gradient",
    "test_ppo.py::test_ptx_adds_exactly_coef_times_the_lm_loss_gradient",
    # batteries: the fast tier keeps one case of each kind of failure
    "test_label_load.py::",
    "test_cli.py::test_generate_sharded_mesh_matches_default",
    "test_cli.py::test_generate_greedy_ignores_seed",
    "test_cli.py::test_generate_jsonl_prompt_file_with_line_breaks",
    "test_run_failures.py::test_no_restorable_checkpoint_is_one_line_naming_the_directory",
    "test_run_failures.py::test_a_failing_save_is_one_line_and_keeps_the_last_checkpoint",
    "test_run_models.py::test_all_steps_skips_a_checkpoint_it_cannot_restore",
    "test_run_models.py::test_a_named_step_that_cannot_be_restored_stops_and_leaves_no_output",
    "test_user_errors_more.py::test_a_second_signal_during_a_save_stops_in_one_line_with_exit_4",
    "test_pipeline_safety.py::test_generate_output_never_replaces_an_unrelated_file",
    "test_pipeline_safety.py::test_a_moved_pipeline_run_dir_keeps_its_finished_steps",
    "test_layers.py::test_public_entry_points_run_as_modules[rlhf_jax.convert]",
    "test_layers.py::test_public_entry_points_run_as_modules[rlhf_jax.evaluate]",
    "test_layers.py::test_public_entry_points_run_as_modules[rlhf_jax.generate]",
    "test_plan.py::test_grpo_iteration_holds_the_reward_model_only_when_it_scores",
    "test_plan.py::test_dpo_holds_its_reference_as_an_argument_unless_precomputed",
    "test_dpo.py::test_gradient_at_the_reference_is_the_closed_form[ipo-0.0]",  # sigmoid (with smoothing): fast
    "test_dpo.py::test_accumulation_and_precomputed_reference_equal_one_batch",  # the stage run compares them too
    # grpo's and rloo's repeats: the fast tier runs each stage, the first ratio, learning and one reward-function
    # mistake once
    "test_grpo.py::test_first_minibatch_ratio_is_exactly_one[",  # the fast tier's stage runs check the first ratio
    "test_grpo.py::test_a_reward_function_preferring_some_tokens_raises_the_reward[rloo]",
    "test_grpo.py::test_first_step_through_the_rollouts_forward_equals_a_direct_gradient",
    "test_grpo.py::test_grpo_stage_resumes_bitwise",
    "test_grpo.py::test_rloo_stage_with_a_reward_function",  # the reward function's view: the fast tier's unit test
    "test_grpo.py::test_a_minibatch_step_averages_over_its_own_rows_and_tokens[sequence]",  # [token]: fast
    "test_grpo.py::test_reward_function_mistakes_stop_the_stage_in_one_line[raises",
    "test_grpo.py::test_reward_function_mistakes_stop_the_stage_in_one_line[not_finite",
    "test_grpo.py::test_reward_function_mistakes_stop_the_stage_in_one_line[one_short",  # the wrapper's test: fast
    # one prompt pass per group: the loop of layers' case and the sampler's are fast; the scanned stack's, and the
    # precomputed DPO reference's stage run (resumed, reading its stored tables) in this tier
    "test_token_stats.py::test_a_groups_shared_prompt_pass_gives_each_rows_own_pass[gemma3-True]",
    "test_sampling_exit.py::test_a_groups_prefill_runs_once_and_the_rows_draw_what_they_drew_alone[True]",
    "test_dpo.py::test_precomputed_reference_gives_the_live_losses_and_a_resumed_run_reads_its_tables",
    # the newer families: the fast tier checks each one's logits and import/export, and one windowed cached decode
    *(f"test_model.py::test_greedy_generation_matches_transformers[{f}]" for f in (
        "qwen3", "mistral", "gemma2", "gemma3", "gpt2_untied", "llama_tied")),  # logits parity covers their heads
    "test_families.py::test_transformers_loads_our_export",
    "test_families.py::test_sequence_classification_export_scores_like_transformers",
    *(f"test_families.py::test_cached_decode_and_left_padding_equal_the_full_pass_past_the_window[{f}]"
      for f in ("mistral", "gemma2", "qwen3")),
    "test_lora.py::test_merge_adds_scale_times_b_at_a_to_the_named_hf_matrices_only[targets1]",
    # repeats of checks the fast tier makes once: greedy decoding (cached decode of gpt2 and llama, logits of every
    # family stay), sampling at 0.7 without filters (0.7 with top-k and top-p stays), qwen2's export read by
    # transformers (its exact round trip stays), the second full-size config
    "test_model.py::test_greedy_generation_matches_transformers[gpt2]",
    "test_model.py::test_greedy_generation_matches_transformers[qwen2]",
    "test_model.py::test_sampler_logprobs_equal_teacher_forced[0.7-0-1.0]",
    "test_hf.py::test_transformers_loads_our_export[qwen2]",
    "test_model.py::test_full_size_configs_build_abstractly[qwen2.5_7b]",
    # the evaluation with the gold scorer alone samples the pairs again (the fast tier checks its refusals)
    "test_evaluate.py::test_the_gold_scorer_alone_judges_without_a_reward_model",
    # stage runs checking one setting's wiring each (their stages run end to end in the fast tier)
    "test_grpo.py::test_the_reward_models_normalisation_is_applied",
    "test_run_models.py::test_a_value_model_of_its_own_keeps_its_normalisation_through_the_run",
    "test_dpo.py::test_resume_refuses_a_reference_replaced_at_its_path",
    "test_cli.py::test_new_tokens_may_fill_the_models_positions_exactly",  # two generate runs
    # the loop's own non-finite check stays fast (test_training_loop.py); this one runs a stage into divergence
    "test_run_failures.py::test_divergence_stops_with_exit_3_and_saves_nothing_non_finite",
    "test_losses.py::test_the_sft_loss_of_packed_rows_is_the_mean_nll_of_their_targets[False]",  # [True]: fast
    "test_run_models.py::test_a_finished_run_reruns_to_its_end_and_another_shape_of_state_is_refused",
    # two dry runs of their own (the dry run's sizes and verdicts are checked in the fast tier on sft)
    "test_plan.py::test_dpos_precomputed_reference_pass_is_planned_beside_the_training_state",
)


def pytest_collection_modifyitems(items):
    for item in items:
        node = item.nodeid.removeprefix("tests/")
        if any(node.startswith(prefix) for prefix in FULL_TIER):
            item.add_marker(pytest.mark.full)
    # Every test worker runs a session fixture for itself. The tests of the demo run come first, so that they fall
    # in the first worker's share (pytest-xdist hands out contiguous runs of the collection and steals from their
    # ends) and the demo pipeline runs once, not once per worker.
    items.sort(key=lambda item: "demo_run" not in item.fixturenames)
