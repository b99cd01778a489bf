"""retrain: validate -> train -> evaluate challenger and champion on one holdout -> gate ->
promote (only if the gate passes) -> predict the test set with the champion -> submission."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from flows.cli import checked_params, run_with_prefect
from flows.params import (
    DispatchParams,
    GateParams,
    TrainParams,
    ValidationParams,
    failed,
    report_state,
    route_library_logs,
)
from protein.data import fingerprint, open_dataset
from protein.data.channels import parse_channel_ref
from protein.errors import (
    DataError,
    EvidenceRefused,
    FingerprintMismatch,
    OutOfMemory,
    PromotionConflict,
    ProteinError,
)
from protein.evaluation.data_order import DataOrder
from protein.evaluation.gated_data import covers
from protein.locations import default_store_uri
from protein.preload import GATE_REPORT_MODULES, SCORING_MODULES, preload
from protein.registry.records import flow_training_run_id
from tasks.channels import data_push_order, resolve_dataset
from tasks.deployment_check import check_deployment, definition_gate_of_this_run
from tasks.dispatch import dispatch as dispatch_step
from tasks.dispatch import lost_after_refusal
from tasks.evaluation import (
    check_challenger_split,
    earlier_gate_decision,
    evaluate_models,
    gate,
    gate_evaluation_of_run,
    withdraw_gate_pass,
)
from tasks.prediction import predict_submission, publish_submission_of_run
from tasks.registry import current_champion, find_run_model, promote_model, report_promotion_again
from tasks.summary import (
    champion_data_fingerprint,
    data_fingerprint,
    dataset_uri_problem,
    gate_judged_data,
    publish_run_summary,
)
from tasks.training import train_model
from tasks.validation import validate_data


def data_label(data: str) -> str:
    try:
        if (ref := parse_channel_ref(data)) is not None:
            return ref.name  # resolved once, in the run, not again for its name
        return fingerprint(open_dataset(data))[:8]
    except Exception:  # an unreadable dataset still gets a run; validation then says why
        return "unreadable"


def retrain_run_name() -> str:
    return f"retrain-{data_label(flow_run.parameters['data'])}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M}"


@flow(name="retrain", flow_run_name=retrain_run_name, log_prints=True)
def retrain(
    data: str,
    store: str | None = None,
    train: TrainParams = TrainParams(),
    gate_config: GateParams = GateParams(),
    validation: ValidationParams = ValidationParams(),
    train_deployment: str | None = None,
    score_deployment: str | None = None,
    dispatch: DispatchParams = DispatchParams(),
    skip_if_unchanged: bool = False,
    trigger_event: str | None = None,
    allow_older_data: bool = False,
) -> dict[str, Any] | State:
    """Retrain on a dataset and promote the challenger only if it beats the champion on rows
    neither trained on; then write the champion's test-set submission.

    Args:
        data: a dataset channel, resolved once when the run starts to its newest push
            (channel:latest in the run's store, or s3://bucket/prefix/datasets@latest), or a
            dataset as the worker sees it: a folder, the competition zip, s3://bucket/prefix/ or
            s3://bucket/key.zip
        store: model store: a local folder or s3://bucket/prefix; empty takes the worker's
            PROTEIN_STORE (default work/store)
        train: how to train the challenger
        gate_config: when the challenger replaces the champion
        validation: what the data must look like before anything is trained on it
        train_deployment: run training as this deployment on the GPU work pool (e.g. train/gpu),
            waiting and dispatching again as `dispatch` says; empty trains inside this run
        score_deployment: score challenger and champion for the gate, and predict the test set,
            as this deployment on the GPU work pool (e.g. score/gpu); the results come back
            through the store. Empty scores inside this run
        dispatch: how long and how often to wait for the train and score deployments
        skip_if_unchanged: complete without training when the champion was trained on exactly
            this data (on for the nightly schedule, off for manual runs)
        trigger_event: set by the deployment trigger to the event that started the run, so a bad
            event is named in the failure and a push superseded by a newer one is not trained
            twice; leave empty
        allow_older_data: promote even when the challenger's data is older (in the channel's push
            order) than the champion's; the promotion records that this run allowed it
    """
    # The form checks each field; the config the bounds across them (batch, accumulate and nproc, device).
    if refused := train.refusal():
        return refused
    logger = get_run_logger()
    route_library_logs()
    if trigger_event and (problem := dataset_uri_problem(data)):
        # Fail before any task: the run's message names the event and the field, not a stack trace.
        field = "payload.channel" if data.strip().startswith("channel:") else "payload.uri"
        return failed(f"event {trigger_event}: field {field} is {problem}; nothing was run", DataError.exit_code)
    store = store or default_store_uri()  # read on the worker at run time, not at import
    if defined := definition_gate_of_this_run():  # no person started it: git's gate, not the API's
        origin, values = defined
        given, gate_config = gate_config, GateParams(**values)
        if gate_config != given:  # logged from the value now in force, so the line shows what the gate uses
            logger.warning("this %s run was given gate settings %s; it uses deployments/prefect.yaml's %s",
                           origin, given.model_dump(), gate_config.model_dump())
        if allow_older_data:  # a person's decision, recorded with the promotion; no person started this run
            logger.warning("this %s run was given allow_older_data; it is off: only a run a person starts may "
                           "promote older data", origin)
            allow_older_data = False
    # Once, here: every step below works on this immutable dataset, whatever is pushed meanwhile.
    resolved = resolve_dataset(data, store, trigger_event_id(trigger_event), str(flow_run.id) if flow_run.id else None)
    if resolved.get("problem"):
        return failed(f"data {data}: {resolved['problem']}", resolved.get("exit_code", 1))
    named, data = data, resolved["uri"]
    summary: dict[str, Any] = {"data": data, "links": {}, "resolved_from": resolved if resolved["channel"] else None}
    if (pushed := resolved["trigger_sequence"]) is not None and pushed < resolved["sequence"]:
        # Coalesced: the newer push's own event started (or queued) a run that trains the newest
        # data; training it here too would train the same data twice.
        message = (f"nothing trained: push #{pushed} on channel {resolved['channel']!r} was superseded by push "
                   f"#{resolved['sequence']} ({resolved['fingerprint'][:12]}), which its own run trains")
        logger.info(message)
        publish_run_summary({**summary, "outcome": "skipped, superseded by a newer push",
                             "data_fingerprint": resolved["fingerprint"], "message": message})
        return Completed(message=message, data={"skipped": True, "superseded_by": resolved["sequence"]})
    champion = current_champion(store)
    summary["champion_before"] = summary["champion_after"] = champion
    judged = already_judged(data, store, resolved, champion, train) if skip_if_unchanged else None
    if judged and (earlier := model_of_an_earlier_attempt(store, judged[0])):
        # A rerun (Retry in the UI, Prefect's retries) of a run that trained this data and stopped
        # before its end (a failed submission, a lost lease): what it judged is its own work.
        logger.info("not skipped: an earlier attempt of this run registered %s on this data; this attempt goes "
                    "on from where it stopped", earlier)
        judged = None
    if judged:
        current, message = judged
        logger.info(message)
        publish_run_summary({**summary, "outcome": "skipped, data unchanged", "data_fingerprint": current,
                             "message": message})
        return Completed(message=message, data={"champion": champion, "skipped": True,
                                                "data_fingerprint": current, "reason": message})

    if (train_deployment or score_deployment) and (problem := lost_after_refusal(dispatch.to_config())):
        return Failed(message=f"{problem}; nothing was validated or trained")  # not after minutes of validation
    # Both before anything is validated, and each again before its dispatch: a changed score deployment
    # first found after hours of training left nothing judged, and every night trained again.
    try:
        for deployment in filter(None, (train_deployment, score_deployment)):
            check_deployment(deployment)
    except RuntimeError as exc:  # DeploymentChanged: one line naming it
        return Failed(message=str(exc))
    report = validate_data(data, validation.to_config(), store)
    summary["data_fingerprint"] = report["data_fingerprint"]
    if resolved["fingerprint"] and report["data_fingerprint"] != resolved["fingerprint"]:
        return failed(f"{data} has fingerprint {report['data_fingerprint']}, but channel {resolved['channel']!r} "
                      f"recorded {resolved['fingerprint']} for it; nothing was trained", FingerprintMismatch.exit_code)
    summary["links"]["validation report"] = report["report_uri"]
    if not report["success"]:
        message = (f"data failed validation ({len(report['failures'])} findings): "
                   f"{'; '.join(report['failures'][:3])}; report: {report['report_uri'] or 'see artifact'}")
        publish_run_summary({**summary, "outcome": "data failed validation", "message": message})
        return Failed(message=message)

    run_id = flow_training_run_id(report["data_fingerprint"], flow_run.id)
    config = train.to_config()
    if train_deployment:
        # While the GPU host trains: torch when this run scores the challenger itself, and what its
        # gate report draws with, whoever scores.
        preload((() if score_deployment else SCORING_MODULES) + GATE_REPORT_MODULES)
        try:
            check_deployment(train_deployment)
            dispatch_step("train", train_deployment,
                          {"data": data, "store": store, "train": train.model_dump(), "run_id": run_id,
                           "expected_fingerprint": report["data_fingerprint"]}, run_id, dispatch.to_config())
        except RuntimeError as exc:
            return Failed(message=str(exc))
        challenger = find_run_model(store, run_id)
        if challenger is None:
            return Failed(message=f"training run {run_id} completed but registered no model in {store}")
        try:  # the GPU host wrote its model.json: the gate's rows are this run's split, not the host's
            check_challenger_split(data, store, challenger, config, report["data_fingerprint"])
        except EvidenceRefused as exc:
            return failed(str(exc), exc.exit_code)
    else:
        try:
            challenger = train_model(data, store, config, run_id, train.share_cache,
                                     expected_fingerprint=report["data_fingerprint"], nproc=train.nproc)["model_id"]
        except OutOfMemory as exc:  # says what to change; the deployment path reports it through dispatch
            return failed(str(exc), exc.exit_code)
    summary["challenger"] = challenger

    # A rerun whose earlier attempt gated this challenger (and promoted it, or not), then stopped: its
    # gate record stands. Gating it again would overwrite that record, and could promote it over a
    # rollback made since; the champion against itself would be refused.
    try:
        earlier = earlier_gate_decision(store, challenger)
    except ProteinError as exc:
        return failed(f"{exc}; nothing was gated or promoted", exc.exit_code)
    if earlier is not None or challenger == champion:
        decision = decision_of_an_earlier_attempt(challenger, champion, earlier)
        promote_now = bool(decision.pop("promote_now", False))
        if earlier is not None and earlier.get("served") and decision["promote"]:
            report_promotion_again(store, challenger, decision)
    else:
        # Both on rows neither trained on (the champion may predate a data change): see docs/gate.md.
        try:
            evaluation = gate_evaluation(data, store, run_id, challenger, champion, report["data_fingerprint"],
                                         score_deployment, dispatch, gate_config.metric)
        except (RuntimeError, EvidenceRefused, FingerprintMismatch) as exc:  # failed, never ran, or does not check out
            return failed(str(exc), getattr(exc, "exit_code", 1))
        order = data_push_order(named, store, report["data_fingerprint"],
                                champion_data_fingerprint(store, champion) if champion else None)
        try:
            decision = gate(store, challenger, champion, evaluation["challenger"], evaluation["champion"],
                            gate_config.to_config(), DataOrder(**order, allow_older=allow_older_data,
                                                               allowed_by=flow_actor() if allow_older_data else None),
                            {**resolved, "uri": data, "fingerprint": report["data_fingerprint"]})
        except EvidenceRefused as exc:  # the two evaluations cannot be compared
            return failed(f"{exc}; nothing was promoted", exc.exit_code)
        promote_now = bool(decision["promote"])
    if promote_now:
        try:
            champion = promote_model(store, challenger, champion, reason="; ".join(decision["reasons"]),
                                     decision=decision)["champion"]
        except PromotionConflict as exc:  # another promotion moved the champion since this run read it
            return lost_promotion(store, challenger, exc, summary, decision)
    outcome = "promoted" if decision["promote"] else "kept champion" if champion else "refused, no champion yet"
    logger.info("gate: %s (%s)", outcome, "; ".join(decision["reasons"]))
    links = {**summary["links"], "gate record": decision["record_uri"], "training plot": decision.get("plot_uri")}
    result = {"champion": champion, "challenger": challenger, "promoted": decision["promote"],
              "reasons": decision["reasons"], "challenger_score": decision["challenger_score"],
              "champion_score": decision.get("champion_score"), "submission": None,
              "data_fingerprint": report["data_fingerprint"], "run_id": run_id}
    if champion is None:  # a first challenger the gate refused: no model may write a submission
        logger.info("no submission: there is no champion to write it")
        publish_run_summary({**summary, "outcome": outcome, "gate": decision, "links": links})
        return result

    try:
        submission = submission_uri(data, store, run_id, champion, report["data_fingerprint"], score_deployment,
                                    dispatch)
    except Exception as exc:  # the store down past retries, a bad record, an OOM: the promotion above still stands
        reason = str(exc) if isinstance(exc, (ProteinError, RuntimeError)) else f"{type(exc).__name__}: {exc}"
        message = f"{reason} (the gate's decision stands: champion is {champion})"
        publish_run_summary({**summary, "outcome": f"{outcome}; no submission", "champion_after": champion,
                             "gate": decision, "links": links, "message": message})
        return failed(message, getattr(exc, "exit_code", 1))
    publish_run_summary({**summary, "outcome": outcome, "champion_after": champion, "gate": decision,
                         "links": {**links, "submission": submission}})
    return {**result, "submission": submission}


def model_of_an_earlier_attempt(store: str, data_fingerprint: str) -> str | None:
    """The model an earlier attempt of this flow run registered on this data (None on a first attempt)."""
    if (flow_run.run_count or 1) <= 1 or not flow_run.id:
        return None
    return find_run_model(store, flow_training_run_id(data_fingerprint, flow_run.id))


def decision_of_an_earlier_attempt(challenger: str, champion: str | None,
                                   earlier: dict[str, Any] | None) -> dict[str, Any]:
    """This attempt's decision for a challenger an earlier attempt of this run gated (``earlier``: its
    gate record's decision, with whether the challenger ever served), or that is already the
    champion. It is never gated again. ``promote_now``: the earlier attempt passed it against the
    champion that still serves and stopped before promoting; this attempt promotes it."""
    if earlier is None:  # already the champion, with no gate of this run's: a person promoted it
        return {"promote": False, "challenger_score": None, "champion_score": None, "record_uri": None,
                "reasons": [f"{challenger}, this run's challenger, is already the champion (promoted outside this "
                            "run's gate); not gated against itself"]}
    promote, promote_now = False, False
    if earlier.get("served"):
        promote = challenger == champion
        why = (f"{challenger} was promoted by an earlier attempt of this run; this attempt went on to the submission"
               if promote else f"{challenger} was promoted by an earlier attempt of this run, and the champion is "
               f"{champion or 'none'} now (rolled back or replaced since): not judged or promoted again")
    elif earlier.get("promote") and (earlier.get("promotion") or {}).get("landed", True):
        judged_against = earlier.get("judged_against")
        promote = promote_now = judged_against == champion
        why = (f"an earlier attempt of this run passed {challenger} against {judged_against or 'no champion'}, the "
               "champion still, and stopped before promoting it: promoted now" if promote else
               f"an earlier attempt of this run passed {challenger} against {judged_against or 'no champion'}, but the "
               f"champion is {champion or 'none'} now: not promoted on a judgement of another champion")
    elif earlier.get("promote"):
        why = f"an earlier attempt of this run passed {challenger}, but its promotion lost to another; not retried"
    else:
        why = f"the gate refused {challenger} in an earlier attempt of this run; not judged again"
    return {**earlier, "promote": promote, "promote_now": promote_now, "reasons": [*earlier.get("reasons", []), why]}


def winner(store: str) -> str | None:
    try:
        return current_champion(store)
    except ProteinError:
        return None


def lost_promotion(store: str, challenger: str, conflict: PromotionConflict, summary: dict[str, Any],
                   decision: dict[str, Any]) -> State:
    """The gate passed, the promotion lost the compare-and-swap: the gate's records withdraw the pass
    (protein.pipeline.evaluation.withdraw_gate_pass), the summary says so, the run fails in one line."""
    message = (f"PromotionConflict: {conflict}; the gate passed {challenger}, which does not serve: its gate record "
               "says so, and the next scheduled run judges this data against the champion now")
    try:
        withdraw_gate_pass(store, challenger, str(conflict))
    except ProteinError as exc:
        message = (f"PromotionConflict: {conflict}; the gate passed {challenger}, which does not serve, and its "
                   f"records could not say so ({exc}): gates/by-data/ may still call this data promoted")
    publish_run_summary({**summary, "outcome": "gate passed, promotion lost", "champion_after": winner(store),
                         "gate": {**decision, "verdict": "passed, promotion lost to another"}, "message": message})
    return failed(message, conflict.exit_code)


def trigger_event_id(trigger_event: str | None) -> str | None:
    """The event id in the trigger's "<event name> <event id>" (None for a run nobody triggered)."""
    return trigger_event.split()[-1] if trigger_event and trigger_event.strip() else None


def flow_actor() -> str:
    return f"prefect-flow-run:{flow_run.id}"


def already_judged(data: str, store: str, resolved: dict[str, Any], champion: str | None,
                   train: TrainParams) -> tuple[str, str] | None:
    """(fingerprint, why nothing is trained) when the champion was trained on this data, or the gate
    already judged a challenger trained on it with this training config; else None. Without the
    second, a challenger the gate refused had its data retrained every night."""
    current = resolved["fingerprint"] or data_fingerprint(data)
    if champion and current == champion_data_fingerprint(store, champion):
        return current, (f"nothing trained: the data (fingerprint {current[:12]}) is what champion {champion} was "
                         "trained on, and skip_if_unchanged is on")
    if (judged := gate_judged_data(store, current, train.to_config())) and covers(judged, resolved):
        verdict = "promoted" if judged["promoted"] else "refused"
        return current, (f"nothing trained: challenger {judged['challenger']} was trained on this data (fingerprint "
                         f"{current[:12]}) with this training config and the gate {verdict} it "
                         f"({judged['decided'][:16]}); skip_if_unchanged is on, a manual run retrains")
    return None


def gate_evaluation(data: str, store: str, run_id: str, challenger: str, champion: str | None,
                    data_fingerprint: str, score_deployment: str | None, dispatch: DispatchParams,
                    metric: str = "f1_samples") -> dict[str, Any]:
    """Challenger and champion scored for the gate (thresholds tuned for its metric): here, or by
    the score deployment on the gpu pool, whose result comes back through the store.
    RuntimeError when that deployment failed."""
    if not score_deployment:
        return evaluate_models(data, store, challenger, champion, metric, data_fingerprint)
    check_deployment(score_deployment)  # DeploymentChanged is a RuntimeError: the run fails naming it
    dispatch_step("score-gate", score_deployment, {"step": "gate", "data": data, "store": store, "run_id": run_id,
                                                   "model": challenger, "champion": champion, "metric": metric},
                  run_id, dispatch.to_config())
    return gate_evaluation_of_run(data, store, run_id, challenger, champion, data_fingerprint, metric)


def submission_uri(data: str, store: str, run_id: str, champion: str, data_fingerprint: str,
                   score_deployment: str | None, dispatch: DispatchParams) -> str:
    """The champion's test-set submission, written here or by the score deployment."""
    if not score_deployment:
        return predict_submission(data, store, champion, as_champion=True, expected_fingerprint=data_fingerprint)["uri"]
    check_deployment(score_deployment)
    dispatch_step("score-predict", score_deployment, {"step": "predict", "data": data, "store": store,
                                                      "run_id": run_id, "model": champion},
                  run_id, dispatch.to_config())
    return publish_submission_of_run(data, store, run_id, champion, data_fingerprint)["uri"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__)
    parser.add_argument("--data", required=True, help="channel:NAME (the newest push, resolved at start), dataset "
                        "folder, competition zip, s3://bucket/prefix/ or .zip")
    parser.add_argument("--store", default=default_store_uri(), help="local folder or s3://bucket/prefix")
    parser.add_argument("--arch", default=TrainParams().arch)
    parser.add_argument("--epochs", type=int, default=TrainParams().epochs)
    parser.add_argument("--image-size", type=int, default=TrainParams().image_size)
    parser.add_argument("--batch-size", type=int, default=TrainParams().batch_size)
    parser.add_argument("--seed", type=int, default=TrainParams().seed)
    parser.add_argument("--expected-image-size", type=int, default=ValidationParams().image_size,
                        help="image size validation expects")
    parser.add_argument("--min-score", type=float, default=GateParams().min_score)
    parser.add_argument("--min-gain", type=float, default=GateParams().min_gain)
    parser.add_argument("--train-deployment", help="run training as this deployment (e.g. train/gpu)")
    parser.add_argument("--score-deployment", help="score and predict as this deployment (e.g. score/gpu)")
    parser.add_argument("--allow-older-data", action="store_true",
                        help="promote even if the data is older in push order than the champion's (recorded)")
    args = parser.parse_args(argv)

    def parameters() -> tuple[TrainParams, GateParams, ValidationParams]:
        train = TrainParams(arch=args.arch, epochs=args.epochs, image_size=args.image_size,
                            batch_size=args.batch_size, seed=args.seed)
        train.checked_config()  # the bounds across fields (batch and accumulate), before any server starts
        return (train, GateParams(min_score=args.min_score, min_gain=args.min_gain),
                ValidationParams(image_size=args.expected_image_size))

    params = checked_params("python -m flows.retrain", parameters)
    if isinstance(params, int):
        return params
    train, gate_config, validation = params

    def run() -> int:
        state = retrain(
            data=args.data, store=args.store, train=train, gate_config=gate_config, validation=validation,
            train_deployment=args.train_deployment,
            score_deployment=args.score_deployment,
            allow_older_data=args.allow_older_data,
            return_state=True,
        )
        return report_state(state, "retrain")

    return run_with_prefect("python -m flows.retrain", run)


if __name__ == "__main__":
    sys.exit(main())
