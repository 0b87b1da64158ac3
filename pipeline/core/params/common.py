"""Sections every stage reads: paths and tracking."""

from __future__ import annotations

from pydantic import Field

from pipeline.core.params.base import Section


class Paths(Section):
    """Every file and folder the pipeline reads or writes, relative to the repo root."""

    base_model: str = Field(description="Folder of the safetensors base checkpoint written by `base_model`.")
    lineage: str = Field(description="Folder of the per-stage lineage records (one JSON file per stage).")
    metrics: str = Field(description="Folder of DVC metrics files.")
    plots: str = Field(description="Folder of DVC plots data and PNG curves.")
    reports: str = Field(description="Folder of human-readable reports (validation, decontamination).")
    train_prompts: str = Field(description="Project-authored constraint prompts used to make training data.")
    test_prompts: str = Field(description="Test prompts (role: reported): the headline and the model-index; "
                              "disjoint from train and dev, and never read by any choice.")
    dev_prompts: str = Field(description="Dev prompts (role: selection): the sweep rule, thresholds and calibrated "
                             "defaults read these; disjoint from train and test, never reported as a result.")
    generations: str = Field(description="Sampled completions from `generate` (JSONL).")
    rated: str = Field(description="On-policy rows in the ultrafeedback shape written by `rate` (JSONL).")
    ingested_sources: str = Field(default="outputs/ingested_sources", description="One folder per data source, "
                                  "written by its `ingest_source` stage and merged by `ingest`.")
    ingested: str = Field(description="Normalised rows from every source written by `ingest` (folder).")
    decontam_sets: str = Field(default="outputs/decontam_sets", description="sha256 records of the "
                               "decontamination sets (stages decontam_set, decontam_own), a DVC dep of `build`.")
    takedowns: str = Field(default="data/takedowns.yaml", description="Git-tracked takedown file: sha256 of raw "
                           "records to drop at ingest, with reason and date, never the text "
                           "(pipeline.data.takedowns); a DVC dep of every ingest stage.")
    validated: str = Field(description="Rows that passed validation, written by `validate` (folder).")
    dataset: str = Field(description="The built DPO dataset: Parquet splits and provenance (folder).")
    checkpoints: str = Field(description="Training checkpoints (DVC persist: survives reruns for resume).")
    ref_logps: str = Field(description="Cached reference log-probabilities keyed by model and data hashes.")
    model: str = Field(description="Folder of the trained, merged safetensors model written by `train`.")
    eval_dir: str = Field(description="Evaluation outputs: per-prompt Parquet files (folder).")
    eval_cache: str = Field(description="Cache of evaluation generations, log-probs and judgments (DVC persist).")
    converted_models: str = Field(default=".openrelease/converted", description="Cache of checkpoints converted for a generation backend (ctranslate2), one folder per source-weights sha256, converter version and quantization.")
    ifeval_prompts: str | None = Field(default=None, description="IFEval-format prompts (key, prompt, "
                                       "instruction_id_list, kwargs) evaluated beside test_prompts; null: none.")
    judge_labels: str | None = Field(default=None, description="Human-labelled judge pairs the evaluate stage "
                                     "measures its judge on every run (judge_human_* metrics; a kappa interval "
                                     "that includes 0 makes the judge unreliable); null: no check against people.")
    general_prompts: str = Field(description="General prompt set for the judged win rate (JSONL or JSON array).")
    judge_template: str = Field(description="Pairwise judge prompt template with {instruction}, {response_a}, {response_b}.")
    cards: str = Field(description="Model and dataset cards written by `card` (a folder with model/ and dataset/).")
    release: str = Field(description="The release bundle folder (dry-run publishes write here).")
    keys: str = Field(description="Git-ignored folder for a locally generated signing key pair.")
    runs: str = Field(default=".openrelease/runs",
                      description="Git-ignored folder of run records (times, hosts, commit, MLflow ids); not a DVC "
                                  "output, so they never change dvc.lock. The release manifest reads them.")
    sweeps: str = Field(default="sweeps", description="Git-tracked folder of sweep records (`openrelease sweep` "
                        "writes <sweep_id>.json); the `sweep_report` stage builds the sweep table from them.")

    def own_eval_sets(self) -> dict[str, str]:
        """The project's own evaluation prompt files by paths key (test, dev, IFEval subset, general):
        training data is always decontaminated against every one of them."""
        keys = ("test_prompts", "dev_prompts", "ifeval_prompts", "general_prompts")
        return {k: getattr(self, k) for k in keys if getattr(self, k, None)}

    def prompt_roles(self) -> dict[str, str]:
        """The three prompt roles, which must be disjoint: train makes data, dev selects, test reports."""
        return {"train": self.train_prompts, "dev": self.dev_prompts, "test": self.test_prompts}


class Tracking(Section):
    """MLflow settings. The URI itself comes from MLFLOW_TRACKING_URI or defaults to ./mlflow.db."""

    experiment: str = Field(min_length=1, description="MLflow experiment name that holds every pipeline run.")
    connect_timeout_s: float = Field(gt=0, le=120, description="Seconds to wait for a remote tracking server.")
