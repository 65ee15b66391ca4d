# azd postdeploy hook (Windows twin of postdeploy.sh): subscribe the blob trigger `on_export` to BlobCreated events
# of the exports container. The `blobs_extension` system key in the webhook URL exists only once the deployed code
# has started, so this runs after `azd deploy`. Safe to run again: PUT updates the subscription.
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

foreach ($name in @('AZURE_FUNCTION_APP_NAME', 'AZURE_RESOURCE_GROUP', 'EXPORTS_CONTAINER_NAME', 'EXPORTS_SYSTEM_TOPIC_ID',
                    'AZURE_STORAGE_ACCOUNT_ID', 'EVENTGRID_DEADLETTER_CONTAINER_NAME')) {
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
$apiVersion = '2022-06-15'
$maxDeliveryAttempts = 30   # Event Grid retries with back-off ...
$eventTtlMinutes = 1440     # ... for at most 24 hours, then dead-letters the event

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

# The same subscription as postdeploy.sh: every BlobCreated under the exports container (no filter on the storage
# API, so ADLS Gen2's CreateFile and FlushWithClose both arrive), retried for 24 hours, then dead-lettered with the
# system topic's identity. The body holds the key: it goes to az through a file, never on a command line.
$body = @{ properties = @{
    destination = @{ endpointType = 'WebHook'; properties = @{
        endpointUrl = "https://$appHost/runtime/webhooks/blobs?functionName=Host.Functions.$functionName&code=$key"
        maxEventsPerBatch = 1; preferredBatchSizeInKilobytes = 64 } }
    filter = @{ includedEventTypes = @('Microsoft.Storage.BlobCreated')
                subjectBeginsWith = "/blobServices/default/containers/$($env:EXPORTS_CONTAINER_NAME)/blobs/" }
    eventDeliverySchema = 'EventGridSchema'
    retryPolicy = @{ maxDeliveryAttempts = $maxDeliveryAttempts; eventTimeToLiveInMinutes = $eventTtlMinutes }
    deadLetterWithResourceIdentity = @{ identity = @{ type = 'SystemAssigned' }; deadLetterDestination = @{
        endpointType = 'StorageBlob'
        properties = @{ resourceId = $env:AZURE_STORAGE_ACCOUNT_ID
                        blobContainerName = $env:EVENTGRID_DEADLETTER_CONTAINER_NAME } } }
} }
$bodyFile = New-TemporaryFile
$url = "$($env:EXPORTS_SYSTEM_TOPIC_ID)/eventSubscriptions/$($subscription)?api-version=$apiVersion"
try {
    [IO.File]::WriteAllText($bodyFile.FullName, ($body | ConvertTo-Json -Depth 10))
    Write-Host "postdeploy: subscribing $functionName to BlobCreated in container '$($env:EXPORTS_CONTAINER_NAME)'"
    & az rest --method put --url $url --body "@$($bodyFile.FullName)" --output none
    if ($LASTEXITCODE -ne 0) {
        Write-Error 'postdeploy: creating the Event Grid subscription failed (see the az output above)'
        exit 1
    }
} finally {
    Remove-Item -Force $bodyFile.FullName -ErrorAction SilentlyContinue
}

# Event Grid validates the webhook (the app answers its handshake) before the subscription is ready.
$state = ''
for ($attempt = 1; $attempt -le $attempts; $attempt++) {
    $state = (& az rest --method get --url $url --query 'properties.provisioningState' --output tsv 2>$null)
    if ($state -eq 'Succeeded') { break }
    if ($state -in @('Failed', 'Canceled')) {
        Write-Error ("postdeploy: Event Grid could not validate the webhook of $app (subscription $state). Check " +
                     "that the app is running, then run this script again.")
        exit 1
    }
    Write-Host "postdeploy: waiting for the event subscription ($state, $attempt/$attempts)"
    Start-Sleep -Seconds $pause
}
if ($state -ne 'Succeeded') {
    Write-Error "postdeploy: the event subscription '$subscription' is still '$state'; run this script again later"
    exit 1
}

Write-Host ("postdeploy: event subscription '$subscription' is in place: BlobCreated under " +
            "'$($env:EXPORTS_CONTAINER_NAME)', retried for $eventTtlMinutes minutes, then dead-lettered into " +
            "'$($env:EVENTGRID_DEADLETTER_CONTAINER_NAME)'")
