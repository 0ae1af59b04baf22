{{- define "raftmq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "raftmq.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "raftmq.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "raftmq.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The headless Service: stable pod DNS names and the cluster's DNS discovery. */}}
{{- define "raftmq.headless" -}}
{{- printf "%s-headless" (include "raftmq.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "raftmq.secretName" -}}
{{- default (include "raftmq.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "raftmq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "raftmq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "raftmq.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "raftmq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
