from __future__ import annotations

from django import forms


class NewServerForm(forms.Form):
    name = forms.CharField(max_length=32, help_text="letters, digits and hyphens; tools show as <name>_<tool>")
    url = forms.CharField(label="Endpoint", max_length=2000, required=False,
                          widget=forms.URLInput(attrs={"placeholder": "https://tools.example.org/mcp"}),
                          help_text="Streamable HTTP (or SSE) endpoint")
    token = forms.CharField(label="Bearer Token", required=False, widget=forms.PasswordInput(render_value=False),
                            help_text="optional; stored encrypted and never shown again")
    command = forms.ChoiceField(required=False)  # replaced in __init__ by the operator's list, or removed

    def __init__(self, *args: object, commands: list[str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type] # Form's own signature takes these
        if commands:
            self.fields["command"] = forms.ChoiceField(
                label="or a stdio command", required=False, choices=[("", "—")] + [(c, c) for c in commands],
                help_text="one the operator listed in OPTIMAGPT_MCP_STDIO_COMMANDS")
        else:
            del self.fields["command"]

    def clean(self) -> dict[str, object]:
        data = super().clean() or {}
        if bool(data.get("url")) == bool(data.get("command")):
            raise forms.ValidationError("Give an endpoint URL, or choose a stdio command (not both).")
        return data
