{{- define "spoke-agent.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "spoke-agent.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "spoke-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spoke-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "spoke-agent.labels" -}}
{{ include "spoke-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fleet-hub
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "spoke-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "spoke-agent.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "spoke-agent.apiSecret" -}}
{{- default (printf "%s-api" (include "spoke-agent.fullname" .)) .Values.apiTokenSecret -}}
{{- end -}}

{{- define "spoke-agent.joinSecret" -}}
{{- default (printf "%s-join" (include "spoke-agent.fullname" .)) .Values.hub.existingSecret -}}
{{- end -}}

{{/* The Secret holding the agent's serving certificate; empty with tls.enabled false. */}}
{{- define "spoke-agent.tlsSecret" -}}
{{- if .Values.tls.existingSecret -}}
{{ .Values.tls.existingSecret }}
{{- else if .Values.tls.enabled -}}
{{ include "spoke-agent.fullname" . }}-tls
{{- end -}}
{{- end -}}

{{- define "spoke-agent.scheme" -}}
{{ if include "spoke-agent.tlsSecret" . }}HTTPS{{ else }}HTTP{{ end }}
{{- end -}}
