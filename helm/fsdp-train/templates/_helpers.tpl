{{/* Chart name, truncated to the 63 characters DNS labels allow. */}}
{{- define "fsdp-train.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; short enough that "<name>-workers-<job>-<index>" pod hostnames stay valid. */}}
{{- define "fsdp-train.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else if contains (include "fsdp-train.name" .) .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "fsdp-train.name" .) | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Chart name and version, as the helm.sh/chart label wants them. */}}
{{- define "fsdp-train.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's pods; never change them on upgrade (selectors are immutable). */}}
{{- define "fsdp-train.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fsdp-train.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object: the standard set plus commonLabels. */}}
{{- define "fsdp-train.labels" -}}
helm.sh/chart: {{ include "fsdp-train.chart" . }}
{{ include "fsdp-train.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* An object's metadata.annotations block: commonAnnotations merged with (dict "extra" ...); nothing when both are empty. */}}
{{- define "fsdp-train.annotations" -}}
{{- $all := merge (deepCopy (.extra | default dict)) (.root.Values.commonAnnotations | default dict) }}
{{- with $all }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The metadata every top-level object shares: name, labels and annotations. Pass (dict "root" $ "name" ... "labels" (dict) "annotations" (dict)). */}}
{{- define "fsdp-train.metadata" -}}
name: {{ .name | default (include "fsdp-train.fullname" .root) }}
labels:
  {{- include "fsdp-train.labels" .root | nindent 2 }}
  {{- with .labels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- include "fsdp-train.annotations" (dict "root" .root "extra" .annotations) }}
{{- end }}

{{/* Headless Service giving each Indexed Job pod a stable DNS name (IndexedJob only; JobSet makes its own). */}}
{{- define "fsdp-train.serviceName" -}}
{{- printf "%s-workers" (include "fsdp-train.fullname" .) }}
{{- end }}

{{/* Claim holding the checkpoints: the existing one, else the one this chart creates. */}}
{{- define "fsdp-train.claimName" -}}
{{- default (printf "%s-checkpoints" (include "fsdp-train.fullname" .)) .Values.checkpoint.pvc.existingClaim }}
{{- end }}

{{/* ServiceAccount of the pods: the named one, else the created one, else the namespace's default. */}}
{{- define "fsdp-train.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fsdp-train.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* registry/repository@digest, or registry/repository:tag (tag defaults to the chart's appVersion). */}}
{{- define "fsdp-train.image" -}}
{{- $image := .Values.image }}
{{- $repository := ternary (printf "%s/%s" $image.registry $image.repository) $image.repository (ne $image.registry "") }}
{{- if $image.digest }}
{{- printf "%s@%s" $repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (toString (default .Chart.AppVersion $image.tag)) }}
{{- end }}
{{- end }}

{{/* The trainer's shutdown_grace, with the trainer's own default (TrainConfig.shutdown_grace) when unset. */}}
{{- define "fsdp-train.shutdownGrace" -}}
{{- .Values.trainer.shutdown_grace | default 25 }}
{{- end }}

{{/* Cross-field rules that values.schema.json cannot express. */}}
{{- define "fsdp-train.validate" -}}
{{- $e := .Values.elastic }}
{{- if gt (int $e.minReplicas) (int $e.maxReplicas) }}
{{- fail (printf "elastic.minReplicas (%v) must not exceed elastic.maxReplicas (%v)" $e.minReplicas $e.maxReplicas) }}
{{- end }}
{{- if or (lt (int .Values.replicas) (int $e.minReplicas)) (gt (int .Values.replicas) (int $e.maxReplicas)) }}
{{- fail (printf "replicas (%v) must lie within [elastic.minReplicas, elastic.maxReplicas] = [%v, %v]" .Values.replicas $e.minReplicas $e.maxReplicas) }}
{{- end }}
{{- if and (not .Values.checkpoint.pvc.create) (not .Values.checkpoint.pvc.existingClaim) }}
{{- fail "no checkpoint storage: set checkpoint.pvc.create=true or checkpoint.pvc.existingClaim=<claim>" }}
{{- end }}
{{- if and .Values.data.existingClaim (hasKey .Values.trainer "data") }}
{{- fail "trainer.data is set by data.existingClaim and data.mountPath; remove it from trainer" }}
{{- end }}
{{- with .Values.data.prepare }}
{{- if and .enabled (not (and $.Values.data.existingClaim $.Values.data.subPath .sourceClaim)) }}
{{- fail "data.prepare.enabled needs data.existingClaim and data.subPath (where the dataset goes) and data.prepare.sourceClaim (where the raw files are)" }}
{{- end }}
{{- end }}
{{- if hasKey .Values.trainer "checkpoint_dir" }}
{{- fail "trainer.checkpoint_dir is set by checkpoint.dir; remove it from trainer" }}
{{- end }}
{{- if and .Values.kueue.queueName (eq .Values.workload.kind "PyTorchJob") }}
{{- fail "kueue.queueName cannot be used with workload.kind=PyTorchJob: Kueue no longer enables its kubeflow.org/pytorchjob integration by default (Kubeflow Trainer v1 is deprecated there); use workload.kind=TrainJob, JobSet or IndexedJob" }}
{{- end }}
{{- $grace := float64 (include "fsdp-train.shutdownGrace" .) }}
{{- $needed := int (ceil (addf $grace 10)) }}
{{- if lt (int .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be at least trainer.shutdown_grace (%v) + 10 = %v: torchrun waits the grace + 5 s for the emergency checkpoint and needs up to 5 s to exit; raise terminationGracePeriodSeconds or lower trainer.shutdown_grace" .Values.terminationGracePeriodSeconds $grace $needed) }}
{{- end }}
{{- end }}

{{/* The trainer's config file (ConfigMap content). */}}
{{- define "fsdp-train.trainerConfig" -}}
{{- $config := deepCopy .Values.trainer }}
{{- $_ := set $config "checkpoint_dir" .Values.checkpoint.dir }}
{{- $_ := set $config "checkpoint_every" .Values.checkpoint.every }}
{{- $_ := set $config "snapshot_every" .Values.memoryTier.every }}
{{- $_ := set $config "device" (ternary "cuda" "cpu" .Values.gpu.enabled) }}
{{- if .Values.data.existingClaim }}
{{- $_ := set $config "data" (trimSuffix "/" (printf "%s/%s" .Values.data.mountPath .Values.data.subPath)) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* The workload's Kueue queue label, when kueue.queueName is set (a dict, for the metadata helper). */}}
{{- define "fsdp-train.kueueLabels" -}}
{{- if .Values.kueue.queueName }}
{{- toYaml (dict "kueue.x-k8s.io/queue-name" .Values.kueue.queueName) }}
{{- else }}
{{- toYaml dict }}
{{- end }}
{{- end }}

{{/*
`suspend:` of a Kueue-managed workload. A new one starts suspended, for Kueue to admit. An existing
one keeps the value it has now: rendering `true` on every upgrade would patch an admitted, running
workload back to suspended (helm's three-way merge), and leaving it out would unsuspend a queued one.
Pass (dict "root" $ "apiVersion" ... "kind" ...). Nothing without Kueue.
*/}}
{{- define "fsdp-train.suspend" -}}
{{- $root := .root }}
{{- if $root.Values.kueue.queueName }}
{{- $live := lookup .apiVersion .kind $root.Release.Namespace (include "fsdp-train.fullname" $root) }}
{{- if and $live $live.spec (hasKey $live.spec "suspend") }}
suspend: {{ $live.spec.suspend }}
{{- else }}
suspend: true
{{- end }}
{{- end }}
{{- end }}

{{/*
PET_* rendezvous settings for torchrun. `host` is the first pod's DNS name, which hosts the c10d
store. Pass (dict "root" $ "host" "..." "nnodes" true|false); without nnodes the range is given
another way (TrainJob: `launch --nnodes`, because Kubeflow Trainer overwrites PET_NNODES).
*/}}
{{- define "fsdp-train.rendezvousEnv" -}}
{{- $v := .root.Values }}
{{- if .nnodes }}
- name: PET_NNODES
  value: {{ printf "%v:%v" $v.elastic.minReplicas $v.elastic.maxReplicas | quote }}
{{- end }}
- name: PET_RDZV_BACKEND
  value: c10d
- name: PET_RDZV_ENDPOINT
  value: {{ printf "%s:%v" .host $v.elastic.rendezvousPort | quote }}
- name: PET_RDZV_ID
  value: {{ include "fsdp-train.fullname" .root | quote }}
- name: PET_MAX_RESTARTS
  value: {{ $v.elastic.maxRestarts | quote }}
- name: PET_RDZV_CONF
  value: {{ printf "last_call_timeout=%v" $v.elastic.lastCallTimeout | quote }}
{{- end }}

{{/*
The Job spec every Job-based kind shares (IndexedJob directly; JobSet and TrainingRuntime as their
replicated Job): backoff, failure policy and the pod template, none of which depends on `replicas`.
Pass the pod spec's arguments; the pods never restart in place (restartPolicy Never), the Job replaces them.
*/}}
{{- define "fsdp-train.jobSpec" -}}
{{- $v := .root.Values -}}
completionMode: Indexed
backoffLimit: {{ $v.workload.backoffLimit }}
podFailurePolicy:
  rules:
    # Evicted, preempted or drained pods are replaced without using up backoffLimit.
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
    # Exit code 2 is a rejected config or command line (one line in the pod log): retrying cannot help.
    - action: FailJob
      onExitCodes:
        containerName: {{ .containerName }}
        operator: In
        values: [2]
template:
  {{- include "fsdp-train.podTemplate" (merge (dict "restartPolicy" "Never") .) | nindent 2 }}
{{- end }}

{{/* The worker pod template: labels, annotations and the shared pod spec. Same arguments as the pod spec. */}}
{{- define "fsdp-train.podTemplate" -}}
{{- $v := .root.Values -}}
metadata:
  labels:
    {{- include "fsdp-train.selectorLabels" .root | nindent 4 }}
    app.kubernetes.io/component: worker
    {{- with $v.commonLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with merge (deepCopy ($v.podAnnotations | default dict)) ($v.commonAnnotations | default dict) }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- include "fsdp-train.podSpec" . | trim | nindent 2 }}
{{- end }}

{{/* The scheduling and security part of every pod spec (workers and the helm test pod). */}}
{{- define "fsdp-train.podSecurityAndScheduling" -}}
{{- $v := .Values -}}
automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
{{- if or $v.serviceAccount.create $v.serviceAccount.name }}
serviceAccountName: {{ include "fsdp-train.serviceAccountName" . }}
{{- end }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The worker pod spec shared by all four workload kinds. Pass (dict "root" $ "containerName" "..."
"rendezvousEnv" (rendered env items, may be empty) "args" (extra launch flags, may be empty)
"restartPolicy" (Never for the Job-based kinds; PyTorchJob sets its own) "subdomain" (IndexedJob's
headless Service; JobSet sets its own)).
*/}}
{{- define "fsdp-train.podSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values -}}
{{- with .restartPolicy }}
restartPolicy: {{ . }}
{{- end }}
{{- with .subdomain }}
subdomain: {{ . }}
{{- end }}
{{ include "fsdp-train.podSecurityAndScheduling" $root }}
terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.schedulerName }}
schedulerName: {{ . }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .containerName }}
    image: {{ include "fsdp-train.image" $root | quote }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    command: ["fsdp-train", "launch"]
    args:
      {{- toYaml (concat (.args | default list) (list "--config" "/etc/fsdp-train/config.yaml")) | nindent 6 }}
    env:
      - name: FSDP_TRAIN_RUN_ID
        value: {{ printf "%s-%s" $root.Release.Namespace (include "fsdp-train.fullname" $root) | quote }}
      - name: PET_NPROC_PER_NODE
        value: {{ $v.nprocPerNode | quote }}
      {{- with .rendezvousEnv }}
      {{- . | trim | nindent 6 }}
      {{- end }}
      - name: HOME
        value: /tmp
      {{- if $v.memoryTier.every }}
      - name: FSDP_TRAIN_SNAPSHOT_ROOT
        value: {{ include "fsdp-train.snapshotRoot" $root }}
      {{- end }}
      - name: PYTHONUNBUFFERED
        value: "1"
      {{- with $v.pythonPath }}
      - name: PYTHONPATH
        value: {{ join ":" . | quote }}
      {{- end }}
      {{- with $v.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    ports:
      - name: rendezvous
        containerPort: {{ $v.elastic.rendezvousPort }}
        protocol: TCP
    {{- if and (eq (toString .restartPolicy) "Never") (include "fsdp-train.restartInPlace" $root) }}
    # A failed agent's container restarts in place (KEP-5307): same pod, node and memory snapshots. Not on
    # success (0) or a rejected config (2, which fails the Job through its podFailurePolicy).
    restartPolicy: Never
    restartPolicyRules:
      - action: Restart
        exitCodes:
          operator: NotIn
          values: [0, 2]
    {{- end }}
    {{- with $v.containerSecurityContext }}
    securityContext:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- $resources := deepCopy ($v.resources | default dict) }}
    {{- if $v.gpu.enabled }}
    {{- $limits := merge (dict "nvidia.com/gpu" (toString (int $v.nprocPerNode))) ($resources.limits | default dict) }}
    {{- $_ := set $resources "limits" $limits }}
    {{- end }}
    {{- with $resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      - name: checkpoints
        mountPath: {{ $v.checkpoint.dir }}
      - name: config
        mountPath: /etc/fsdp-train
        readOnly: true
      - name: dshm
        mountPath: /dev/shm
      {{- if $v.memoryTier.every }}
      - name: snapshots
        mountPath: {{ include "fsdp-train.snapshotRoot" $root }}
      {{- end }}
      - name: tmp
        mountPath: /tmp
      {{- if $v.data.existingClaim }}
      - name: data
        mountPath: {{ $v.data.mountPath }}
        readOnly: true
      {{- end }}
      {{- with $v.extraVolumeMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
volumes:
  - name: checkpoints
    persistentVolumeClaim:
      claimName: {{ include "fsdp-train.claimName" $root }}
  - name: config
    configMap:
      name: {{ include "fsdp-train.fullname" $root }}
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $v.shmSize }}
  {{- if $v.memoryTier.every }}
  - name: snapshots
    emptyDir:
      medium: Memory
      sizeLimit: {{ include "fsdp-train.snapshotSizeLimit" $root | quote }}
  {{- end }}
  - name: tmp
    emptyDir: {}
  {{- if $v.data.existingClaim }}
  - name: data
    persistentVolumeClaim:
      claimName: {{ $v.data.existingClaim }}
      readOnly: true
  {{- end }}
  {{- with $v.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Where the memory snapshots live in the pod: the mount path of the `snapshots` memory emptyDir. */}}
{{- define "fsdp-train.snapshotRoot" -}}
/var/run/fsdp-train/snapshots
{{- end }}

{{/*
The built-in transformer's size presets (trainer.preset): TrainConfig's PRESETS, which a test keeps
this table equal to.
*/}}
{{- define "fsdp-train.presets" -}}
tiny: {d_model: 64, n_layers: 2, n_heads: 4, seq_len: 64}
small: {d_model: 256, n_layers: 4, n_heads: 8, seq_len: 256}
125m: {d_model: 768, n_layers: 12, n_heads: 12, seq_len: 1024}
1b: {d_model: 2048, n_layers: 16, n_heads: 32, seq_len: 2048}
{{- end }}

{{/*
Size limit of the snapshots volume: memoryTier.sizeLimit, or, for the built-in models, two snapshots of
each local rank's share of the state (weights + two AdamW moments, fp32: 12 bytes per parameter, twice)
when the job runs on its fewest pods (elastic.minReplicas), plus 25% and 64Mi of headroom. The sizes are
trainer's, over its preset's, over the trainer's defaults; the vocabulary is trainer.vocab_size, or
256 ids of synthetic data (a dataset's vocabulary is unknown here: it must be given). Your own model's
size is unknown here too: the limit must be set.
*/}}
{{- define "fsdp-train.snapshotSizeLimit" -}}
{{- $v := .Values -}}
{{- if $v.memoryTier.sizeLimit -}}
{{ $v.memoryTier.sizeLimit }}
{{- else -}}
{{- $t := $v.trainer -}}
{{- $model := $t.model | default "toy" -}}
{{- $params := 408 -}}
{{- if eq $model "transformer" -}}
{{- $preset := dict -}}
{{- if $t.preset -}}
{{- $preset = index (include "fsdp-train.presets" . | fromYaml) (toString $t.preset) | default dict -}}
{{- end -}}
{{- if and $v.data.existingClaim (not $t.vocab_size) -}}
{{- fail "memoryTier.sizeLimit: set trainer.vocab_size to your dataset's vocabulary (vocab_size in its dataset.json), or memoryTier.sizeLimit" -}}
{{- end -}}
{{- $d := int (coalesce $t.d_model (get $preset "d_model") 64) -}}
{{- $layers := int (coalesce $t.n_layers (get $preset "n_layers") 2) -}}
{{- $vocab := int (coalesce $t.vocab_size 256) -}}
{{- $hidden := mul (div (add (mul 2 (int ($t.ffn_mult | default 4)) $d) 23) 24) 8 -}}
{{- $params = add (mul 2 $vocab $d) (mul $layers (add (mul 4 $d $d) (mul 3 $d $hidden) (mul 2 $d))) $d -}}
{{- else if ne $model "toy" -}}
{{- fail (printf "memoryTier.sizeLimit: set it for your own model (trainer.model %s): 2 x 12 bytes per parameter / elastic.minReplicas, plus headroom; or memoryTier.every=0" $model) -}}
{{- end -}}
{{- $bytes := div (mul 24 $params) (max 1 (int $v.elastic.minReplicas)) -}}
{{- add (div (mul $bytes 5) 4) 67108864 -}}
{{- end -}}
{{- end }}

{{/* Whether failed trainer containers restart in place: restartInPlace, or with auto, a cluster of 1.35 or newer. */}}
{{- define "fsdp-train.restartInPlace" -}}
{{- $mode := .Values.restartInPlace -}}
{{- if or (eq (toString $mode) "true") (and (eq (toString $mode) "auto") (semverCompare ">=1.35.0-0" .Capabilities.KubeVersion.Version)) -}}
true
{{- end -}}
{{- end }}
