# azd postdeploy hook (Windows twin of postdeploy.sh): subscribe the blob trigger `on_export` to BlobCreated events
# of the exports container. The `blobs_extension` system key in the webhook URL exists only once the deployed code
# has started, so this runs after `azd deploy`. Safe to run again: `create` on an existing subscription updates it.
#
# Needs: az (logged in: `az login`), and azd unless the values below are already in the environment. Run by azd,
# or by hand from the repository root.
$ErrorActionPreference = 'Stop'

function Assert-Tool([string]$tool) {
    if (-not (Get-Command $tool -ErrorAction SilentlyContinue)) {
        Write-Error "postdeploy: '$tool' is not installed; see docs/deploy.md (Prerequisites)"
        exit 1
    }
}
Assert-Tool 'az'

# azd hands its environment values to hooks; load them when the script runs on its own.
if (-not $env:AZURE_FUNCTION_APP_NAME) {
    Assert-Tool 'azd'
    Write-Host "postdeploy: loading values from 'azd env get-values'"
    foreach ($line in (& azd env get-values)) {
        if ($line -match '^([^=]+)=(.*)$') {
            [Environment]::SetEnvironmentVariable($matches[1], ($matches[2] -replace '^"|"$'))
        }
    }
}

foreach ($name in @('AZURE_FUNCTION_APP_NAME', 'AZURE_RESOURCE_GROUP', 'EXPORTS_CONTAINER_NAME', 'EXPORTS_SYSTEM_TOPIC_NAME')) {
    if (-not [Environment]::GetEnvironmentVariable($name)) {
        Write-Error "postdeploy: $name is not set: run 'azd provision' first"
        exit 1
    }
}

$app = $env:AZURE_FUNCTION_APP_NAME
$group = $env:AZURE_RESOURCE_GROUP
$appHost = if ($env:AZURE_FUNCTION_APP_HOSTNAME) { $env:AZURE_FUNCTION_APP_HOSTNAME } else { "$app.azurewebsites.net" }
$functionName = 'on_export' # the Python function name of the blob trigger in function_app.py
$subscription = if ($env:EXPORTS_EVENT_SUBSCRIPTION_NAME) { $env:EXPORTS_EVENT_SUBSCRIPTION_NAME } else { 'exports-blob-created' }
$attempts = if ($env:BLOBS_KEY_ATTEMPTS) { [int]$env:BLOBS_KEY_ATTEMPTS } else { 18 }
$pause = if ($env:BLOBS_KEY_RETRY_SECONDS) { [int]$env:BLOBS_KEY_RETRY_SECONDS } else { 10 }

# The host creates the key when it first starts with the blob trigger loaded; give a cold start time.
$key = ''
for ($attempt = 1; $attempt -le $attempts; $attempt++) {
    $key = (& az functionapp keys list --name $app --resource-group $group `
                --query 'systemKeys.blobs_extension' --output tsv 2>$null)
    if ($key) { break }
    Write-Host "postdeploy: waiting for the blobs_extension key of $app ($attempt/$attempts)"
    Start-Sleep -Seconds $pause
}
if (-not $key) {
    Write-Error ("postdeploy: no blobs_extension system key on $app. Check that the deployment succeeded and the " +
                 "app starts (Application Insights, or 'az functionapp function list'), then run this script again.")
    exit 1
}

# The key is part of the URL: it is never printed. The URL contains '&', which cmd.exe (behind az.cmd) would treat
# as a command separator, so it is passed wrapped in double quotes, as the Azure sample does.
$endpoint = "https://$appHost/runtime/webhooks/blobs?functionName=Host.Functions.$functionName&code=$key"
$quotedEndpoint = '"' + $endpoint + '"'

Write-Host "postdeploy: subscribing $functionName to BlobCreated in container '$($env:EXPORTS_CONTAINER_NAME)'"
& az eventgrid system-topic event-subscription create `
    --name $subscription `
    --resource-group $group `
    --system-topic-name $env:EXPORTS_SYSTEM_TOPIC_NAME `
    --endpoint-type webhook `
    --endpoint $quotedEndpoint `
    --included-event-types Microsoft.Storage.BlobCreated `
    --subject-begins-with "/blobServices/default/containers/$($env:EXPORTS_CONTAINER_NAME)/blobs/" `
    --output none
if ($LASTEXITCODE -ne 0) {
    Write-Error 'postdeploy: creating the Event Grid subscription failed (see the az output above)'
    exit 1
}

Write-Host "postdeploy: event subscription '$subscription' is in place on topic $($env:EXPORTS_SYSTEM_TOPIC_NAME)"
