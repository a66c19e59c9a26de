"""Every cross-section compatibility rule of the experiment config: one package, one module per concern.

A section's own constraints (a range, a required key) live in its schema (:mod:`fedlm.config.schema`); a
component's constraints on its own parameters live with the component (an aggregator's or objective's
``check_config``, so that adding one touches one file). Everything else, a combination of sections that cannot
work, is one small function here whose docstring says why. :func:`check_config` runs the rules a config can be
judged on at load (:func:`fedlm.config.io.validate_config` calls it); :func:`check_federation` runs those that
need the real client names (called when a run's data is partitioned).

Rules ask components for their declared capabilities (``needs_individual_updates``, ``uploads_extras``,
``byzantine_bound``, ...), never for their names.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlm.config.rules.adapters import (
    audit_needs_sft,
    data_attacks_need_sft,
    exact_lora_keeps_no_factor_state,
    init_adapter_fits,
    lora_mode_fits,
    lora_modes_need_lora,
    objective_accepts_config,
)
from fedlm.config.rules.aggregation import aggregator_accepts_config, attack_parameters_valid, attackers_within_bounds
from fedlm.config.rules.compression import (
    broadcast_downlink_fits_the_nodes,
    compression_downlink_error_feedback,
    fedkseed_fits_the_run,
    uplink_compression_not_under_secure_aggregation,
)
from fedlm.config.rules.continual import continual_fits_the_run, continual_runs_in_the_simulation
from fedlm.config.rules.contribution import (
    contribution_needs_validation_set,
    contribution_prices_every_coalition,
    contribution_sampling_needs_scores,
    contribution_sees_individual_updates,
    exact_shapley_small_rounds,
)
from fedlm.config.rules.federation import (
    audit_client_exists,
    client_ranks_fit_clients,
    client_ranks_one_per_client,
    clients_per_round_within_clients,
    clients_per_round_within_federation,
    min_clients_within_round,
    node_local_keeps_data_on_the_nodes,
)
from fedlm.config.rules.hardware import (
    attention_runs_on_device,
    checkpointing_fits_the_method,
    client_processes_not_in_ray_workers,
    client_processes_split_a_plain_batch,
    full_needs_unquantized_base,
    model_device_exists,
    quantization_runs_on_device,
    simulation_engine_fits_this_machine,
)
from fedlm.config.rules.hierarchy import (
    hierarchy_fits_the_aggregation,
    hierarchy_groups_fit_clients,
    hierarchy_runs_in_the_simulation,
    hierarchy_without_client_wrappers,
)
from fedlm.config.rules.offsite import offsite_fits_the_adapter, offsite_layers_fit_the_model, offsite_runs_in_the_simulation
from fedlm.config.rules.personalization import personalization_fits_the_adapter, personalization_runs_in_the_simulation
from fedlm.config.rules.privacy import (
    client_dp_needs_only_the_sum,
    client_dp_target_reachable,
    client_dp_wrapper_settings,
    distributed_dp_needs_secure_aggregation,
    sample_dp_covers_every_upload,
    sample_dp_needs_lora,
    secure_aggregation_lora_mode,
    secure_aggregation_needs_only_the_sum,
    secure_aggregation_neighbours_even,
    secure_aggregation_threshold,
    secure_aggregation_without_adaptive_clipping,
)
from fedlm.config.rules.setting import NODE_LOCAL, SECAGG, Rule, Setting, known_num_clients
from fedlm.config.rules.systems import (
    fedbuff_buffer_fits,
    fedbuff_fits_the_run,
    fedbuff_without_round_state,
    partial_work_fits_the_run,
    systems_files_cover_clients,
    systems_files_readable,
    systems_in_the_simulation,
    systems_without_a_stream,
)
from fedlm.config.rules.teacher import teacher_fits_the_training, teacher_key_is_set, teacher_runs_in_the_simulation
from fedlm.config.rules.watermark import watermark_alone_with_new_rounds, watermark_fits_the_training, watermark_runs_in_the_simulation
from fedlm.config.schema import ExperimentConfig

__all__ = ["FEDERATION_RULES", "LOAD_RULES", "NODE_LOCAL", "SECAGG", "Rule", "Setting", "check_config", "check_federation", "known_num_clients"]

#: The rules judged at config load, in the order they are checked (the first refusal is reported).
LOAD_RULES: tuple[Rule, ...] = (
    model_device_exists,
    quantization_runs_on_device,
    attention_runs_on_device,
    full_needs_unquantized_base,
    checkpointing_fits_the_method,
    node_local_keeps_data_on_the_nodes,
    clients_per_round_within_federation,
    client_ranks_one_per_client,
    min_clients_within_round,
    aggregator_accepts_config,
    attack_parameters_valid,
    attackers_within_bounds,
    client_dp_target_reachable,
    distributed_dp_needs_secure_aggregation,
    client_dp_needs_only_the_sum,
    client_dp_wrapper_settings,
    sample_dp_covers_every_upload,
    secure_aggregation_needs_only_the_sum,
    secure_aggregation_lora_mode,
    secure_aggregation_without_adaptive_clipping,
    secure_aggregation_neighbours_even,
    secure_aggregation_threshold,
    lora_modes_need_lora,
    sample_dp_needs_lora,
    exact_lora_keeps_no_factor_state,
    lora_mode_fits,
    init_adapter_fits,
    objective_accepts_config,
    audit_needs_sft,
    data_attacks_need_sft,
    client_processes_not_in_ray_workers,
    client_processes_split_a_plain_batch,
    personalization_runs_in_the_simulation,
    personalization_fits_the_adapter,
    broadcast_downlink_fits_the_nodes,
    compression_downlink_error_feedback,
    uplink_compression_not_under_secure_aggregation,
    fedkseed_fits_the_run,
    simulation_engine_fits_this_machine,
    teacher_runs_in_the_simulation,
    teacher_fits_the_training,
    teacher_key_is_set,
    continual_runs_in_the_simulation,
    continual_fits_the_run,
    systems_in_the_simulation,
    systems_files_readable,
    partial_work_fits_the_run,
    fedbuff_without_round_state,
    fedbuff_fits_the_run,
    fedbuff_buffer_fits,
    systems_without_a_stream,
    offsite_layers_fit_the_model,
    offsite_runs_in_the_simulation,
    offsite_fits_the_adapter,
    contribution_needs_validation_set,
    contribution_sampling_needs_scores,
    contribution_sees_individual_updates,
    contribution_prices_every_coalition,
    exact_shapley_small_rounds,
    hierarchy_runs_in_the_simulation,
    hierarchy_fits_the_aggregation,
    hierarchy_without_client_wrappers,
    hierarchy_groups_fit_clients,
    watermark_runs_in_the_simulation,
    watermark_fits_the_training,
    watermark_alone_with_new_rounds,
)


def check_config(config: ExperimentConfig) -> None:
    """Run every load-time rule on ``config``; the first that refuses raises :class:`FedlmError` naming the fields."""
    setting = Setting(config, known_num_clients(config))
    for rule in LOAD_RULES:
        rule(setting)


#: The rules judged once the partition gives the client names, in order.
FEDERATION_RULES: tuple[Rule, ...] = (
    clients_per_round_within_clients,
    client_ranks_fit_clients,
    audit_client_exists,
    attackers_within_bounds,
    secure_aggregation_threshold,
    systems_files_cover_clients,
    contribution_sampling_needs_scores,
    exact_shapley_small_rounds,
    hierarchy_groups_fit_clients,
)


def check_federation(config: ExperimentConfig, client_names: Sequence[str]) -> None:
    """Run the rules that need the real federation (the partition's ``client_names``); FedlmError on the first refusal."""
    setting = Setting(config, len(client_names), list(client_names))
    for rule in FEDERATION_RULES:
        rule(setting)
