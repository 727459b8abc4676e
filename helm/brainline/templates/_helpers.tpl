{{- define "brainline.fullname" -}}
{{- printf "%s-brainline" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "brainline.labels" -}}
app.kubernetes.io/name: brainline
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "brainline.selector" -}}
app.kubernetes.io/name: brainline
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "brainline.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
{{- end -}}

{{- define "brainline.secretEnv" -}}
- name: {{ .key }}
  valueFrom:
    secretKeyRef: {name: {{ .ctx.Values.existingSecret }}, key: {{ .key }}, optional: {{ .optional }}}
{{- end -}}

{{- define "brainline.commonEnv" -}}
- {name: BRAINLINE_HOME, value: /var/lib/brainline}
- {name: BRAINLINE_WORKSPACES, value: /var/lib/brainline-workspaces}
- {name: BRAINLINE_EXECUTOR, value: {{ .Values.executor | quote }}}
- {name: HOME, value: /tmp}
- {name: MPLCONFIGDIR, value: /tmp/matplotlib}
{{ include "brainline.secretEnv" (dict "ctx" . "key" "BRAINLINE_DATABASE_URL" "optional" false) }}
{{ include "brainline.secretEnv" (dict "ctx" . "key" "BRAINLINE_BROKER_URL" "optional" (ne .Values.executor "celery")) }}
{{- if .Values.extraEnv }}
{{ toYaml .Values.extraEnv }}
{{- end }}
{{- end -}}
