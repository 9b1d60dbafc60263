{{- define "selfpruner.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "selfpruner.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "selfpruner.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "selfpruner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "selfpruner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "selfpruner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "selfpruner.operatorServiceAccount" -}}
{{- default (printf "%s-operator" (include "selfpruner.fullname" .)) .Values.serviceAccount.operator.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The namespaces for PruneJobs: watchNamespaces, or the release namespace. One per line. */}}
{{- define "selfpruner.namespaces" -}}
{{- $ns := .Values.watchNamespaces | default (list .Release.Namespace) }}
{{- range $ns }}
{{ . }}
{{- end }}
{{- end }}

{{- define "selfpruner.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{- define "selfpruner.prunerImage" -}}
{{- printf "%s:%s" .Values.pruner.image.repository (default .Chart.AppVersion .Values.pruner.image.tag) }}
{{- end }}

{{/*
The pruner pods' settings as JSON (SELFPRUNER_PODS, read by pruner_image/selfpruner/cluster/manifests.py
pod_settings): pruner.* without the image (SELFPRUNER_IMAGE carries it), with its pull policy.
*/}}
{{- define "selfpruner.prunerPods" -}}
{{- $pods := omit (deepCopy .Values.pruner) "image" }}
{{- with .Values.pruner.image.pullPolicy }}
{{- $_ := set $pods "imagePullPolicy" . }}
{{- end }}
{{- $pods | toJson }}
{{- end }}

{{/*
The operator's rules on namespaced resources, used by its ClusterRole (scope cluster) or by its Role
in each watched namespace (scope namespaced). Exactly what the code calls; tests/test_chart.py
derives the same set from the sources and compares.
*/}}
{{- define "selfpruner.operatorRules" -}}
# kopf: list/watch PruneJobs; merge-patch them (finalizers, progress annotations).
# handlers.py: nothing else on the main resource.
- apiGroups: ["selfpruner.io"]
  resources: ["prunejobs"]
  verbs: ["list", "watch", "patch"]
# kopf: merge-patch the status subresource with the handlers' patch.status.
- apiGroups: ["selfpruner.io"]
  resources: ["prunejobs/status"]
  verbs: ["patch"]
# handlers.py through kube.py: create_job, read_job, list_jobs, patch_job (suspend), delete_job (a
# finished PruneJob's unfinished Jobs).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "get", "list", "patch", "delete"]
# kube.job_stuck: list_pods (why a controller pod does not start).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# its Jobs' owner references block the PruneJob's deletion (OwnerReferencesPermissionEnforcement).
- apiGroups: ["selfpruner.io"]
  resources: ["prunejobs/finalizers"]
  verbs: ["update"]
# kopf: kopf.info/kopf.warn and handler progress become Events (POST); kube.job_stuck: list
# (FailedCreate: a controller Job that cannot create its pod).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- end }}
