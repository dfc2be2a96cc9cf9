{{/* Chart name, truncated to the 63 characters DNS labels allow. */}}
{{- define "fsdp-train.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; short enough that "<name>-<index>" pod hostnames stay valid. */}}
{{- define "fsdp-train.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else if contains (include "fsdp-train.name" .) .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "fsdp-train.name" .) | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "fsdp-train.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fsdp-train.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fsdp-train.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fsdp-train.labels" -}}
helm.sh/chart: {{ include "fsdp-train.chart" . }}
{{ include "fsdp-train.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Headless Service giving each Indexed Job pod a stable DNS name. */}}
{{- define "fsdp-train.serviceName" -}}
{{- printf "%s-workers" (include "fsdp-train.fullname" .) }}
{{- end }}

{{- define "fsdp-train.claimName" -}}
{{- default (printf "%s-checkpoints" (include "fsdp-train.fullname" .)) .Values.checkpoint.pvc.existingClaim }}
{{- end }}

{{- define "fsdp-train.image" -}}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) }}
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
{{- if hasKey .Values.trainer "checkpoint_dir" }}
{{- fail "trainer.checkpoint_dir is set by checkpoint.dir; remove it from trainer" }}
{{- end }}
{{- end }}

{{/* The trainer's config file (ConfigMap content). */}}
{{- define "fsdp-train.trainerConfig" -}}
{{- $config := deepCopy .Values.trainer }}
{{- $_ := set $config "checkpoint_dir" .Values.checkpoint.dir }}
{{- $_ := set $config "checkpoint_every" .Values.checkpoint.every }}
{{- $_ := set $config "device" (ternary "cuda" "cpu" .Values.gpu.enabled) }}
{{- toYaml $config }}
{{- end }}

{{/* The worker pod spec shared by both workload kinds; pass (dict "root" $ "containerName" "...") */}}
{{- define "fsdp-train.podSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values -}}
automountServiceAccountToken: false
terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
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
containers:
  - name: {{ .containerName }}
    image: {{ include "fsdp-train.image" $root | quote }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    command: ["fsdp-train", "launch"]
    args: ["--config", "/etc/fsdp-train/config.yaml"]
    env:
      - name: FSDP_TRAIN_RUN_ID
        value: {{ printf "%s-%s" $root.Release.Namespace (include "fsdp-train.fullname" $root) | quote }}
      - name: PET_NPROC_PER_NODE
        value: {{ $v.nprocPerNode | quote }}
      {{- with .extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
      - name: HOME
        value: /tmp
      - name: PYTHONUNBUFFERED
        value: "1"
    ports:
      - name: rendezvous
        containerPort: {{ $v.elastic.rendezvousPort }}
    securityContext:
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      runAsNonRoot: true
      capabilities:
        drop: ["ALL"]
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
      - name: tmp
        mountPath: /tmp
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
  - name: tmp
    emptyDir: {}
{{- end }}
